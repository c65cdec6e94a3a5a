"""The message API end to end (CONTRACT section 2): a real `dlkeeper serve` process, its real
Unix socket, raw JSON lines, real .torrent files and a real loopback seeder.

Most tests share one daemon (`shared`) and keep apart by task_id and by torrent; a test that
needs to know the whole state (every completion, the exact bytes of downloads.json) or that
stops the daemon gets its own (`fresh`). Every wait has a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import libtorrent as lt
import pytest

from actors.metainfo import torrent_files, torrent_info_hash
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
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def torrents(self) -> Path:
        return self.downloads / "torrents"

    @property
    def state_file(self) -> Path:
        return self.root / "data" / "downloads.json"

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


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for the tests that keep apart by task_id and torrent."""
    library = make_library(tmp_path_factory.mktemp("shared"))
    started = time.monotonic()
    with running_daemon(library.config) as daemon:
        yield Served(daemon, library, started)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    """A daemon of this test's own, on an empty library."""
    library = make_library(tmp_path)
    started = time.monotonic()
    with running_daemon(library.config) as daemon:
        yield Served(daemon, library, started)


@pytest.fixture
def api(shared: Served) -> Iterator[RawClient]:
    """A connection to the shared daemon."""
    with shared.client() as client:
        yield client


@pytest.fixture
def short_dir() -> Iterator[Path]:
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


# --- the line protocol --------------------------------------------------------------------------


def test_ping_answers_version_and_ready(api: RawClient) -> None:
    reply = api.request("ping")
    assert set(reply) == {"id", "ok", "result"}
    assert reply["ok"] is True
    result = reply["result"]
    assert set(result) == {"version", "ready"}
    assert isinstance(result["version"], str)
    assert result["version"]
    assert result["ready"] is True


@pytest.mark.parametrize("request_id", [7, 0, -3, 2**53, "seven", "", "ünï €"])
def test_the_request_id_is_echoed_with_its_type(api: RawClient, request_id: int | str) -> None:
    api.send_raw(line({"id": request_id, "op": "ping"}))
    reply = api.read_reply()
    assert reply["ok"] is True
    assert reply["id"] == request_id
    assert type(reply["id"]) is type(request_id)


def test_an_error_reply_echoes_the_request_id(api: RawClient) -> None:
    api.send_raw(line({"id": "mine", "op": "get", "task_id": "no-such-download"}))
    reply = api.read_reply()
    assert reply["id"] == "mine"
    assert code_of(reply) == "not_found"


def test_an_unknown_op_is_answered_unknown_op(api: RawClient) -> None:
    assert code_of(api.request("frobnicate")) == "unknown_op"


@pytest.mark.parametrize(
    "bad_line",
    [
        pytest.param(b"garbage", id="not-json"),
        pytest.param(b'{"id": 1, "op": "ping"', id="truncated-json"),
        pytest.param(b'[{"id": 1, "op": "ping"}]', id="array"),
        pytest.param(b'"ping"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"task_id": "x"}', id="missing-op"),
        pytest.param(b'{"op": 5}', id="integer-op"),
        pytest.param(b'{"op": null}', id="null-op"),
        pytest.param(b'{"op": ["ping"]}', id="array-op"),
        pytest.param(b'{"id": true, "op": "ping"}', id="bool-id"),
        pytest.param(b'{"id": 1.5, "op": "ping"}', id="float-id"),
        pytest.param(b'{"id": {"n": 1}, "op": "ping"}', id="object-id"),
        pytest.param(b'{"id": [1], "op": "ping"}', id="array-id"),
        pytest.param(b'{"op": "ping", "x": "\xff\xfe"}', id="not-utf8"),
    ],
)
def test_a_bad_line_is_answered_bad_request_and_the_connection_stays_usable(
    api: RawClient, bad_line: bytes
) -> None:
    api.send_raw(bad_line + b"\n")
    reply = api.read_reply()
    assert reply["id"] is None
    assert code_of(reply) == "bad_request"
    assert api.call("ping")["ready"] is True


@pytest.mark.parametrize(
    ("op", "params"),
    [
        pytest.param("ping", {"extra": 1}, id="ping-unknown-parameter"),
        pytest.param("list", {"status": "paused"}, id="list-unknown-parameter"),
        pytest.param("stats", {"verbose": True}, id="stats-unknown-parameter"),
        pytest.param("get", {}, id="get-without-task_id"),
        pytest.param("get", {"task_id": 5}, id="get-integer-task_id"),
        pytest.param("get", {"task_id": None}, id="get-null-task_id"),
        pytest.param("pause", {"task_id": ["a"]}, id="pause-array-task_id"),
        pytest.param("resume", {"task_id": {"a": 1}}, id="resume-object-task_id"),
        pytest.param("cancel", {"task_id": "a", "delete_files": "yes"}, id="cancel-string-bool"),
        pytest.param("cancel", {"task_id": "a", "delete_files": 1}, id="cancel-integer-bool"),
        pytest.param("set_files", {"task_id": "a"}, id="set_files-without-priorities"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": [8]}, id="priority-8"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": [-1]}, id="priority-neg"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": ["4"]}, id="priority-str"),
        pytest.param("set_files", {"task_id": "a", "file_priorities": 4}, id="priorities-int"),
        pytest.param("ack", {"task_id": 1.5}, id="ack-float-task_id"),
        pytest.param("add", {}, id="add-without-source"),
        pytest.param("add", {"magnet": 5}, id="add-integer-magnet"),
        pytest.param("add", {"torrent_b64": ["x"]}, id="add-array-torrent_b64"),
        pytest.param("add", {"torrent_path": 7}, id="add-integer-torrent_path"),
        pytest.param("add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "name": 3}, id="name"),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "name": ""}, id="empty-name"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "paused": "true"}, id="paused"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "save_path": 1}, id="save_path"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "peers": "1.2.3.4:5"}, id="peers"
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "peers": ["nope"]}, id="peer"
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "peers": ["1.2.3.4:70000"]},
            id="peer-port",
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "torrent_metadata": [1]},
            id="torrent_metadata",
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "validation_metadata": "x"},
            id="validation_metadata",
        ),
        pytest.param(
            "add",
            {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "file_priorities": [1, 9]},
            id="add-priority-9",
        ),
        pytest.param(
            "add", {"magnet": "magnet:?xt=urn:btih:" + "a" * 40, "colour": "red"}, id="add-extra"
        ),
        pytest.param("subscribe", {"progress_interval": "1"}, id="interval-string"),
        pytest.param("subscribe", {"progress_interval": True}, id="interval-bool"),
        pytest.param("subscribe", {"progress_interval": 0}, id="interval-zero"),
        pytest.param("subscribe", {"progress_interval": -1}, id="interval-negative"),
        pytest.param("subscribe", {"topics": ["all"]}, id="subscribe-unknown-parameter"),
    ],
)
def test_wrong_parameters_are_answered_bad_request_and_the_connection_stays_usable(
    api: RawClient, op: str, params: dict[str, Any]
) -> None:
    assert code_of(api.request(op, **params)) == "bad_request"
    assert api.call("ping")["ready"] is True


def test_a_second_subscribe_on_one_connection_is_bad_request(shared: Served) -> None:
    with subscribe(shared) as events:
        assert code_of(events.request("subscribe")) == "bad_request"


def test_pipelined_requests_in_one_write_are_each_answered_under_their_id(
    api: RawClient,
) -> None:
    requests: list[dict[str, Any]] = [
        {"id": 1, "op": "ping"},
        {"id": "1", "op": "stats"},
        {"id": 2, "op": "list"},
        {"id": "two", "op": "get", "task_id": "no-such-download"},
        {"id": 3, "op": "frobnicate"},
        {"id": "3", "op": "ack", "task_id": "no-such-download"},
        *({"id": 100 + n, "op": "ping"} for n in range(20)),
    ]
    api.send_raw(b"".join(line(request) for request in requests))
    replies = [api.read_reply() for _ in requests]
    # 1 and "1" are two ids: a key per id *and* type.
    by_id = {(type(reply["id"]), reply["id"]): reply for reply in replies}
    assert set(by_id) == {(type(request["id"]), request["id"]) for request in requests}
    assert by_id[int, 1]["result"]["ready"] is True
    assert "uptime" in by_id[str, "1"]["result"]
    assert "downloads" in by_id[int, 2]["result"]
    assert code_of(by_id[str, "two"]) == "not_found"
    assert code_of(by_id[int, 3]) == "unknown_op"
    assert code_of(by_id[str, "3"]) == "not_found"
    assert all(by_id[int, 100 + n]["ok"] for n in range(20))


def test_a_slow_request_does_not_hold_up_a_ping_on_the_same_connection(api: RawClient) -> None:
    api.send_raw(line({"id": "slow", "op": "add", "torrent_b64": b64(slow_torrent())}))
    wait_read_by_daemon(api)  # the add is under way
    api.send_raw(line({"id": "quick", "op": "ping"}))
    first, second = api.read_reply(), api.read_reply()
    assert first["id"] == "quick"
    assert first["ok"] is True
    assert second["id"] == "slow"
    assert code_of(second) == "invalid_torrent"


def test_an_endless_line_is_answered_too_large_and_closed_after_about_8_mib(
    shared: Served,
) -> None:
    sent = 0
    with shared.client() as client:

        def send_without_newline() -> None:
            nonlocal sent
            chunk = b"a" * 65536
            try:
                while sent < 4 * MAX_LINE:
                    sent += client.sock.send(chunk)
            except OSError:
                pass  # the daemon hung up

        sender = threading.Thread(target=send_without_newline, daemon=True)
        sender.start()
        reply = client.read_message()
        assert reply["id"] is None
        assert code_of(reply) == "too_large"
        assert_closed(client)
        sender.join(DEADLINE)
        assert not sender.is_alive()
    # Read no further than the limit (plus what the socket buffers hold), never to the end.
    assert MAX_LINE <= sent < MAX_LINE + 4 * MiB


def test_a_too_large_line_leaves_other_connections_served(shared: Served) -> None:
    with shared.client() as bystander, shared.client() as offender:
        send_until_hung_up(offender, b"x" * (MAX_LINE + MiB))
        assert code_of(offender.read_message()) == "too_large"
        assert bystander.call("ping")["ready"] is True
    assert_serving(shared)


def test_a_line_of_exactly_8_mib_is_read_even_when_its_newline_comes_later(
    api: RawClient,
) -> None:
    api.send_raw(padded_ping(MAX_LINE))
    wait_read_by_daemon(api)
    api.send_raw(b"\n")
    reply = api.read_reply()
    assert reply["id"] == 1  # read and parsed: refused for its `pad`, not for its length
    assert code_of(reply) == "bad_request"
    assert api.call("ping")["ready"] is True


def test_a_line_just_over_8_mib_is_too_large_even_when_its_end_comes_in_one_read(
    api: RawClient,
) -> None:
    request = padded_ping(MAX_LINE + 100)
    api.send_raw(request[: MAX_LINE - 10])
    wait_read_by_daemon(api)
    api.send_raw(request[MAX_LINE - 10 :] + b"\n")  # limit crossed and newline, in one read
    reply = api.read_message()
    assert code_of(reply) == "too_large"
    assert_closed(api)


def test_a_disconnect_mid_line_leaves_the_daemon_serving(shared: Served) -> None:
    with shared.client() as client:
        client.send_raw(b'{"id": 1, "op": "pi')
    assert_serving(shared)


def test_a_request_cut_off_by_a_disconnect_is_not_carried_out(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("cut-off")
    request = line(
        {
            "id": 1,
            "op": "add",
            "task_id": task_id,
            "torrent_b64": b64(new_payload(tmp_path).torrent),
        }
    )
    with shared.client() as client:
        client.send_raw(request[:-1])  # all of it but its newline
        assert hang_up_and_wait(client) == b""  # no reply: no request
    assert code_of(api.request("get", task_id=task_id)) == "not_found"
    assert task_id not in shared.library.state()


def test_a_disconnect_before_the_replies_are_read_leaves_the_daemon_serving(
    shared: Served,
) -> None:
    with shared.client() as client:
        # More replies than the socket buffers hold: the daemon is mid-reply when we go.
        client.send_raw(b"".join(line({"id": n, "op": "stats"}) for n in range(3000)))
        assert client.read_reply()["ok"] is True
    assert_serving(shared)


# --- the socket file ----------------------------------------------------------------------------


def test_the_socket_is_a_unix_socket_with_mode_0660(shared: Served) -> None:
    mode = shared.daemon.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_a_stale_socket_file_is_replaced_when_the_daemon_starts(
    tmp_path: Path, short_dir: Path
) -> None:
    path = short_dir / "api.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # a daemon that died left its socket file behind
    leftover.close()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
        pytest.raises(ConnectionRefusedError),
    ):
        probe.connect(str(path))  # nobody listens there
    library = make_library(tmp_path, socket_path=path)
    with running_daemon(library.config), RawClient(path, timeout=DEADLINE) as client:
        assert client.call("ping")["ready"] is True
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660


def test_a_daemon_refused_the_lock_leaves_the_running_daemons_socket_alone(
    fresh: Served,
) -> None:
    before = fresh.daemon.socket.lstat().st_ino
    second = Daemon(fresh.library.config)
    try:
        assert second.process.wait(DEADLINE) == 3
    finally:
        second.close()
    assert fresh.daemon.socket.lstat().st_ino == before
    assert_serving(fresh)


def test_a_file_that_is_not_a_socket_is_not_replaced(tmp_path: Path, short_dir: Path) -> None:
    path = short_dir / "api.sock"
    path.write_text("not a socket\n")
    library = make_library(tmp_path, socket_path=path)
    daemon = Daemon(library.config)
    try:
        assert daemon.process.wait(DEADLINE) == 2
    finally:
        daemon.close()
    assert path.read_text() == "not a socket\n"


# --- add ----------------------------------------------------------------------------------------


def test_add_by_torrent_b64_with_peers_downloads_to_completion(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("b64")
    with seeding_now(payload) as seeder:
        result = add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        assert result == {"task_id": task_id, "info_hash": payload.info_hash, "status": "queued"}
        info = wait_status(api, task_id, "completed")
    assert set(info) == DOWNLOAD_INFO_KEYS
    assert info["progress"] == 1.0
    assert info["info_hash"] == payload.info_hash
    assert info["total_bytes"] == info["downloaded_bytes"] == 136_000
    assert {(f["path"], f["size"]) for f in info["files"]} == {
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    }
    assert is_utc_timestamp(info["completed_at"])
    assert payload_files(payload) == files_under(shared.library.downloads / payload.name)


def test_add_by_torrent_path_downloads_that_torrent_to_completion(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    path = tmp_path / "given.torrent"
    path.write_bytes(payload.torrent)
    task_id = new_id("path")
    with seeding_now(payload) as seeder:
        result = api.call("add", torrent_path=str(path), task_id=task_id, peers=[seeder.peer])
        assert result == {"task_id": task_id, "info_hash": payload.info_hash, "status": "queued"}
        info = wait_status(api, task_id, "completed")
    assert [(f["path"], f["size"]) for f in info["files"]] == [
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    ]
    assert payload_files(payload) == files_under(shared.library.downloads / payload.name)


def test_add_by_magnet_fetches_metadata_and_downloads_to_completion(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("magnet")
    with seeding_now(payload) as seeder:
        result = api.call("add", magnet=seeder.magnet(payload), task_id=task_id)
        assert result == {"task_id": task_id, "info_hash": payload.info_hash, "status": "queued"}
        info = wait_status(api, task_id, "completed")
    assert info["name"] == payload.name  # the magnet's dn
    assert {(f["path"], f["size"]) for f in info["files"]} == {
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    }
    assert payload_files(payload) == files_under(shared.library.downloads / payload.name)


def test_add_without_task_id_makes_one(api: RawClient, shared: Served, tmp_path: Path) -> None:
    result = add_torrent(api, new_payload(tmp_path))
    assert isinstance(result["task_id"], str)
    assert result["task_id"]
    assert api.call("get", task_id=result["task_id"])["task_id"] == result["task_id"]
    assert result["task_id"] in shared.library.state()


@pytest.mark.parametrize("source", ["torrent_b64", "torrent_path"])
def test_add_keeps_a_copy_of_the_torrent_before_replying(
    api: RawClient, shared: Served, tmp_path: Path, source: str
) -> None:
    payload = new_payload(tmp_path)
    given = tmp_path / "given.torrent"
    given.write_bytes(payload.torrent)
    task_id = new_id("copy")
    value = b64(payload.torrent) if source == "torrent_b64" else str(given)
    api.call("add", task_id=task_id, **{source: value})
    copy = shared.library.torrents / f"{task_id}.torrent"
    assert copy.read_bytes() == payload.torrent
    assert shared.library.state()[task_id]["torrent_file_path"] == str(copy)


def test_a_magnet_keeps_a_copy_of_the_torrent_once_metadata_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("magnet-copy")
    copy = shared.library.torrents / f"{task_id}.torrent"
    with seeding_now(payload) as seeder:
        api.call("add", magnet=seeder.magnet(payload), task_id=task_id)
        wait_until(
            lambda: shared.library.state()[task_id]["torrent_file_path"] == str(copy),
            "the .torrent copy to be recorded",
        )
    assert torrent_info_hash(copy.read_bytes()) == payload.info_hash
    assert torrent_files(copy.read_bytes()) == [
        (f"{payload.name}/a.bin", 96_000),
        (f"{payload.name}/sub/b.bin", 40_000),
    ]


def test_add_with_a_name_shows_that_name(api: RawClient, tmp_path: Path) -> None:
    task_id = new_id("named")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, name="Big Buck Bunny (2008)")
    assert api.call("get", task_id=task_id)["name"] == "Big Buck Bunny (2008)"


def test_add_with_a_save_path_inside_download_path_downloads_there(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("saved")
    save_path = shared.library.downloads / "movies" / task_id
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, save_path=str(save_path), peers=[seeder.peer])
        info = wait_status(api, task_id, "completed")
    assert info["save_path"] == str(save_path)
    assert payload_files(payload) == files_under(save_path / payload.name)


def test_add_with_file_priorities_downloads_only_the_wanted_files(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("priorities")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, file_priorities=[7, 0], peers=[seeder.peer])
        info = wait_status(api, task_id, "completed")
    assert [(f["size"], f["priority"]) for f in info["files"]] == [(96_000, 7), (40_000, 0)]
    assert shared.library.state()[task_id]["file_priorities"] == [7, 0]
    wanted = shared.library.downloads / payload.name / "a.bin"
    assert wanted.read_bytes() == (payload.root / payload.name / "a.bin").read_bytes()


def test_add_paused_stays_paused_and_fetches_nothing(api: RawClient, tmp_path: Path) -> None:
    paused, running = new_payload(tmp_path), new_payload(tmp_path)
    paused_id, running_id = new_id("paused"), new_id("running")
    with seeding_now(paused, running) as seeder:
        result = add_torrent(api, paused, task_id=paused_id, paused=True, peers=[seeder.peer])
        assert result["status"] == "paused"
        add_torrent(api, running, task_id=running_id, peers=[seeder.peer])
        wait_status(api, running_id, "completed")  # the same peer had time enough
        info = api.call("get", task_id=paused_id)
    assert info["status"] == "paused"
    assert info["downloaded_bytes"] == 0


def test_add_keeps_the_peers(api: RawClient, shared: Served, tmp_path: Path) -> None:
    task_id = new_id("peers")
    peers = ["127.0.0.1:6881", "[::1]:6882", "localhost:6883"]
    add_torrent(api, new_payload(tmp_path), task_id=task_id, peers=peers)
    assert shared.library.state()[task_id]["peers"] == peers


def test_completed_event_carries_every_field_and_the_metadata_given_to_add(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("event")
    torrent_metadata = {"tmdb": 10378, "title": "Big Buck Bunny", "tags": ["a", {"b": None}]}
    validation_metadata = {"sha256": {"a.bin": "00ff"}, "min_size": 1.5}
    with subscribe(shared) as events, seeding_now(payload) as seeder:
        add_torrent(
            api,
            payload,
            task_id=task_id,
            name="Bunny",
            peers=[seeder.peer],
            torrent_metadata=torrent_metadata,
            validation_metadata=validation_metadata,
        )
        event = wait_event(events, "download.completed", task_id)
    assert set(event) == COMPLETED_EVENT_KEYS
    assert isinstance(event["seq"], int)
    assert event["name"] == "Bunny"
    assert event["info_hash"] == payload.info_hash
    assert event["save_path"] == str(shared.library.downloads.resolve())
    assert event["files"] == [
        {"path": f"{payload.name}/a.bin", "size": 96_000, "priority": 4},
        {"path": f"{payload.name}/sub/b.bin", "size": 40_000, "priority": 4},
    ]
    assert event["torrent_metadata"] == torrent_metadata
    assert event["validation_metadata"] == validation_metadata
    assert is_utc_timestamp(event["completed_at"])


def test_add_of_a_task_id_again_with_the_same_torrent_returns_the_same_download(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("retry")
    first = add_torrent(api, payload, task_id=task_id)
    again = add_torrent(api, payload, task_id=task_id)
    assert again == first
    entries = [e for e in shared.library.state().values() if e["info_hash"] == payload.info_hash]
    assert [entry["task_id"] for entry in entries] == [task_id]


def test_add_of_a_torrent_active_under_another_task_id_is_duplicate_naming_it(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    first, second = new_id("original"), new_id("copycat")
    add_torrent(api, payload, task_id=first)
    error = error_of(api.request("add", torrent_b64=b64(payload.torrent), task_id=second))
    assert error["code"] == "duplicate"
    assert error["task_id"] == first
    assert second not in shared.library.state()


def test_add_of_a_magnet_active_under_another_task_id_is_duplicate_naming_it(
    api: RawClient, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    first = new_id("original")
    add_torrent(api, payload, task_id=first)
    magnet = f"magnet:?xt=urn:btih:{payload.info_hash.upper()}"
    error = error_of(api.request("add", magnet=magnet, task_id=new_id("copycat")))
    assert error["code"] == "duplicate"
    assert error["task_id"] == first


def test_add_of_a_task_id_that_has_another_torrent_is_duplicate(
    api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("taken")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    reply = api.request("add", torrent_b64=b64(new_payload(tmp_path).torrent), task_id=task_id)
    error = error_of(reply)
    assert error["code"] == "duplicate"
    assert error["task_id"] == task_id


@pytest.mark.parametrize(
    "task_id",
    ["a" * 65, "", "has space", "a/b", "..", "tab\t", "new\nline", "end\n", "ünicode", "a.b"],
)
def test_add_with_a_task_id_outside_the_pattern_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path, task_id: str
) -> None:
    reply = api.request("add", torrent_b64=b64(new_payload(tmp_path).torrent), task_id=task_id)
    assert code_of(reply) == "bad_request"
    assert task_id not in shared.library.state()


@pytest.mark.parametrize("task_id", ["a" * 64, "A-z_0-9", "-", "_"])
def test_add_with_a_task_id_inside_the_pattern_is_taken_as_given(
    api: RawClient, tmp_path: Path, task_id: str
) -> None:
    # Unique per run of the shared daemon: the pattern's edges, made unique where they allow.
    given = task_id if len(task_id) == 64 else f"{task_id}{uuid.uuid4().hex[:8]}"
    result = add_torrent(api, new_payload(tmp_path), task_id=given)
    assert result["task_id"] == given
    api.call("cancel", task_id=given)


def test_add_with_two_sources_is_bad_request(api: RawClient, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    reply = api.request(
        "add", torrent_b64=b64(payload.torrent), magnet=f"magnet:?xt=urn:btih:{payload.info_hash}"
    )
    assert code_of(reply) == "bad_request"


def test_add_with_file_priorities_of_the_wrong_length_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("wrong-length")
    reply = api.request(
        "add",
        torrent_b64=b64(new_payload(tmp_path).torrent),
        task_id=task_id,
        file_priorities=[4, 4, 4],
    )
    assert code_of(reply) == "bad_request"
    assert task_id not in shared.library.state()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"hello, world", id="not-bencode"),
        pytest.param(b"d3:fooi1ee", id="no-info"),
        pytest.param(b"d4:infod4:name1:xee", id="no-pieces"),
        pytest.param(b"d4:infod4:name1:x6:pieces20:" + b"p" * 20 + b"e", id="truncated"),
        pytest.param(b"\0", id="zero-byte"),
    ],
)
def test_add_of_torrent_b64_that_is_no_torrent_is_invalid_torrent(
    api: RawClient, data: bytes
) -> None:
    reply = api.request("add", torrent_b64=b64(data), task_id=new_id("garbage"))
    assert code_of(reply) == "invalid_torrent"


@pytest.mark.parametrize("value", ["not base64!", "QUJD*", "QUJDRA"])
def test_add_of_torrent_b64_that_is_not_base64_is_bad_request(api: RawClient, value: str) -> None:
    assert code_of(api.request("add", torrent_b64=value)) == "bad_request"


def test_add_of_a_fifo_as_torrent_path_answers_at_once_with_invalid_torrent(
    api: RawClient, tmp_path: Path
) -> None:
    fifo = tmp_path / "nobody-writes-here.torrent"
    os.mkfifo(fifo)
    api.sock.settimeout(5.0)  # a daemon blocked in open() or read() would never answer
    assert code_of(api.request("add", torrent_path=str(fifo))) == "invalid_torrent"


def test_add_of_a_device_as_torrent_path_is_invalid_torrent(api: RawClient) -> None:
    api.sock.settimeout(5.0)  # a daemon reading /dev/zero to its end would never answer
    assert code_of(api.request("add", torrent_path="/dev/zero")) == "invalid_torrent"


def test_add_of_a_huge_file_as_torrent_path_is_invalid_torrent(
    api: RawClient, tmp_path: Path
) -> None:
    huge = tmp_path / "huge.torrent"
    with huge.open("wb") as file:
        file.truncate(8 * 1024 * MiB)  # sparse: 8 GiB that take no room
    api.sock.settimeout(10.0)
    assert code_of(api.request("add", torrent_path=str(huge))) == "invalid_torrent"


def test_add_of_a_relative_torrent_path_is_bad_request(api: RawClient) -> None:
    assert code_of(api.request("add", torrent_path="some/file.torrent")) == "bad_request"


def test_add_of_a_missing_torrent_path_is_bad_request(api: RawClient, tmp_path: Path) -> None:
    reply = api.request("add", torrent_path=str(tmp_path / "no-such.torrent"))
    assert code_of(reply) == "bad_request"


@pytest.mark.parametrize("op", [None, 5, ["ping"]], ids=["missing", "number", "list"])
def test_a_line_with_no_op_is_answered_with_id_null(api: RawClient, op: object) -> None:
    request: dict[str, object] = {"id": 77}
    if op is not None:
        request["op"] = op
    api.send_raw(json.dumps(request).encode() + b"\n")
    reply = api.read_reply()
    assert reply == {"id": None, "ok": False, "error": reply["error"]}
    assert reply["error"]["code"] == "bad_request"


def test_add_of_a_file_that_is_no_torrent_tells_nothing_of_its_content(
    api: RawClient, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"Zsecret")
    reply = api.request("add", torrent_path=str(secret))
    assert code_of(reply) == "invalid_torrent"
    assert reply["error"]["message"] == f"{secret} is not a .torrent file"


def test_many_requests_sent_without_reading_are_all_answered(api: RawClient) -> None:
    # More than a connection may have in progress: the daemon stops reading, then goes on.
    count = 1000
    api.send_raw(b"".join(b'{"id": %d, "op": "ping"}\n' % n for n in range(count)))
    replies = [api.read_reply() for _ in range(count)]
    assert sorted(reply["id"] for reply in replies) == list(range(count))
    assert all(reply["ok"] for reply in replies)


@pytest.mark.parametrize(
    "magnet",
    [
        "http://example.com/file.torrent",
        "magnet:?dn=no-topic",
        "magnet:?xt=urn:btih:tooshort",
        "magnet:?xt=urn:btih:" + "g" * 40,
        "magnet:?xt=urn:btmh:1220" + "a" * 10,
    ],
)
def test_add_of_a_bad_magnet_is_invalid_magnet(api: RawClient, magnet: str) -> None:
    assert code_of(api.request("add", magnet=magnet)) == "invalid_magnet"


@pytest.mark.parametrize(
    "escape", ["{downloads}/../outside", "{downloads}/a/../../outside", "/tmp", "/", "../up"]
)
def test_add_with_a_save_path_outside_download_path_is_path_not_allowed(
    api: RawClient, shared: Served, tmp_path: Path, escape: str
) -> None:
    task_id = new_id("escape")
    save_path = escape.format(downloads=shared.library.downloads)
    reply = api.request(
        "add", torrent_b64=b64(new_payload(tmp_path).torrent), task_id=task_id, save_path=save_path
    )
    assert code_of(reply) == "path_not_allowed"
    assert task_id not in shared.library.state()


@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_add_with_a_save_path_through_a_symlink_out_of_download_path_is_path_not_allowed(
    api: RawClient, shared: Served, tmp_path: Path, below: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = shared.library.downloads / new_id("link")
    link.symlink_to(outside)
    task_id = new_id("symlink")
    reply = api.request(
        "add",
        torrent_b64=b64(new_payload(tmp_path).torrent),
        task_id=task_id,
        save_path=str(link / below),
    )
    assert code_of(reply) == "path_not_allowed"
    assert task_id not in shared.library.state()


# --- get, list, pause, resume, cancel, set_files, ack -------------------------------------------


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("get", {}),
        ("pause", {}),
        ("resume", {}),
        ("cancel", {}),
        ("cancel", {"delete_files": True}),
        ("set_files", {"file_priorities": [1]}),
        ("ack", {}),
    ],
)
def test_an_unknown_task_id_is_not_found(api: RawClient, op: str, params: dict[str, Any]) -> None:
    assert code_of(api.request(op, task_id=new_id("unknown"), **params)) == "not_found"


def test_get_of_a_fresh_download_shows_every_field(api: RawClient, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("fresh")
    add_torrent(api, payload, task_id=task_id)
    info = api.call("get", task_id=task_id)
    assert set(info) == DOWNLOAD_INFO_KEYS
    assert info["task_id"] == task_id
    assert info["name"] == payload.name
    assert info["info_hash"] == payload.info_hash
    assert info["status"] in {"queued", "checking", "downloading"}
    assert info["progress"] == 0.0
    assert info["total_bytes"] == 136_000
    assert info["completed_at"] is None
    assert info["error"] is None
    assert is_utc_timestamp(info["created_at"])
    assert [f["priority"] for f in info["files"]] == [4, 4]


def test_get_of_a_magnet_without_metadata_has_no_files_yet(api: RawClient) -> None:
    task_id = new_id("no-metadata")
    magnet = f"magnet:?xt=urn:btih:{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}&dn=nobody-has-it"
    api.call("add", magnet=magnet, task_id=task_id)
    info = api.call("get", task_id=task_id)
    assert info["name"] == "nobody-has-it"
    assert info["files"] == []
    assert info["status"] in {"queued", "fetching_metadata"}


def test_list_shows_every_download_in_the_order_added(api: RawClient, tmp_path: Path) -> None:
    task_ids = [new_id("listed") for _ in range(3)]
    for task_id in task_ids:
        add_torrent(api, new_payload(tmp_path), task_id=task_id)
    downloads = api.call("list")["downloads"]
    assert all(set(info) == DOWNLOAD_INFO_KEYS for info in downloads)
    listed = [info["task_id"] for info in downloads]
    assert [task_id for task_id in listed if task_id in task_ids] == task_ids
    created = [datetime.fromisoformat(info["created_at"]) for info in downloads]
    assert created == sorted(created)


def test_pause_pauses_and_resume_resumes(api: RawClient, shared: Served, tmp_path: Path) -> None:
    task_id = new_id("toggle")
    add_started(api, shared.library, new_payload(tmp_path), task_id)
    paused = api.call("pause", task_id=task_id)
    assert set(paused) == DOWNLOAD_INFO_KEYS
    assert paused["status"] == "paused"
    assert api.call("get", task_id=task_id)["status"] == "paused"
    resumed = api.call("resume", task_id=task_id)
    assert resumed["status"] != "paused"
    assert api.call("get", task_id=task_id)["status"] != "paused"


def test_pause_of_a_paused_download_and_resume_of_a_running_one_change_nothing(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("idempotent")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, paused=True)
    assert api.call("pause", task_id=task_id)["status"] == "paused"
    assert api.call("resume", task_id=task_id)["status"] != "paused"
    assert api.call("resume", task_id=task_id)["status"] != "paused"
    assert shared.library.state()[task_id]["status"] in {"queued", "downloading"}


def test_set_files_changes_the_priorities(api: RawClient, tmp_path: Path) -> None:
    task_id = new_id("set-files")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    info = api.call("set_files", task_id=task_id, file_priorities=[0, 7])
    assert set(info) == DOWNLOAD_INFO_KEYS
    assert [f["priority"] for f in info["files"]] == [0, 7]
    assert [f["priority"] for f in api.call("get", task_id=task_id)["files"]] == [0, 7]


def test_set_files_of_the_wrong_length_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("set-wrong")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, file_priorities=[1, 2])
    for wrong in ([3], [3, 3, 3], []):
        reply = api.request("set_files", task_id=task_id, file_priorities=wrong)
        assert code_of(reply) == "bad_request", wrong
    assert shared.library.state()[task_id]["file_priorities"] == [1, 2]


def test_set_files_of_a_magnet_is_checked_once_its_metadata_is_known(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path, {"a.bin": 2_000_000, "sub/b.bin": 40_000})
    task_id = new_id("magnet-files")
    with seeding_now(payload, upload_rate_limit=20_000) as seeder:  # still downloading meanwhile
        api.call("add", magnet=seeder.magnet(payload), task_id=task_id)
        wait_until(lambda: api.call("get", task_id=task_id)["files"], "the magnet's metadata")
        reply = api.request("set_files", task_id=task_id, file_priorities=[1, 1, 1])
        assert code_of(reply) == "bad_request"
        info = api.call("set_files", task_id=task_id, file_priorities=[1, 0])
        assert [f["priority"] for f in info["files"]] == [1, 0]
        api.call("cancel", task_id=task_id)


def test_cancel_removes_the_download(api: RawClient, shared: Served, tmp_path: Path) -> None:
    task_id = new_id("cancelled")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    assert api.call("cancel", task_id=task_id) == {}
    assert code_of(api.request("get", task_id=task_id)) == "not_found"
    assert task_id not in [info["task_id"] for info in api.call("list")["downloads"]]
    assert not (shared.library.torrents / f"{task_id}.torrent").exists()


def test_cancel_with_delete_files_deletes_the_downloaded_files(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("deleted")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        wait_status(api, task_id, "completed")
    downloaded = shared.library.downloads / payload.name
    assert has_files(downloaded)
    assert api.call("cancel", task_id=task_id, delete_files=True) == {}
    wait_until(lambda: not has_files(downloaded), "the downloaded files to be deleted")


def test_cancel_without_delete_files_keeps_the_downloaded_files(
    fresh: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    with fresh.client() as client:
        with seeding_now(payload) as seeder:
            add_torrent(client, payload, task_id="kept", peers=[seeder.peer])
            wait_status(client, "kept", "completed")
        assert client.call("cancel", task_id="kept") == {}
    assert fresh.daemon.stop() == 0  # nothing can delete them after this
    assert payload_files(payload) == files_under(fresh.library.downloads / payload.name)
    assert fresh.library.state() == {}


def test_ack_of_a_completed_download_removes_it_and_keeps_its_files(
    fresh: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    with fresh.client() as client:
        with seeding_now(payload) as seeder:
            add_torrent(client, payload, task_id="done", peers=[seeder.peer])
            wait_status(client, "done", "completed")
        assert client.call("ack", task_id="done") == {}
        assert code_of(client.request("get", task_id="done")) == "not_found"
        assert client.call("list") == {"downloads": []}
    assert fresh.daemon.stop() == 0
    assert payload_files(payload) == files_under(fresh.library.downloads / payload.name)
    assert fresh.library.state() == {}


@pytest.mark.parametrize("paused", [False, True])
def test_ack_of_a_download_not_finished_is_bad_request(
    api: RawClient, shared: Served, tmp_path: Path, paused: bool
) -> None:
    task_id = new_id("unfinished")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, paused=paused)
    assert code_of(api.request("ack", task_id=task_id)) == "bad_request"
    assert task_id in shared.library.state()


def test_pause_of_a_completed_download_is_bad_request(api: RawClient, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("finished")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        wait_status(api, task_id, "completed")
    assert code_of(api.request("pause", task_id=task_id)) == "bad_request"
    assert api.call("get", task_id=task_id)["status"] == "completed"


def test_stats_counts_downloads_by_status(fresh: Served, tmp_path: Path) -> None:
    with fresh.client() as client:
        assert client.call("stats")["downloads"] == {}
        add_torrent(client, new_payload(tmp_path), task_id="one", paused=True)
        add_torrent(client, new_payload(tmp_path), task_id="two", paused=True)
        add_torrent(client, new_payload(tmp_path), task_id="three")
        stats = client.call("stats")
    assert set(stats) == {
        "downloads",
        "resumed_at_start",
        "resume_failures",
        "worker_restarts",
        "uptime",
    }
    assert stats["downloads"]["paused"] == 2
    assert sum(stats["downloads"].values()) == 3
    assert stats["resumed_at_start"] == 0
    assert stats["resume_failures"] == 0
    assert stats["worker_restarts"] == 0


def test_stats_uptime_is_the_seconds_since_the_daemon_started(fresh: Served) -> None:
    with fresh.client() as client:
        uptime = client.call("stats")["uptime"]
        assert isinstance(uptime, float)
        assert 0 <= uptime <= time.monotonic() - fresh.started

        def uptime_if_grown() -> float | None:
            value: float = client.call("stats")["uptime"]
            return value if value > uptime else None

        later = wait_until(uptime_if_grown, "uptime to grow")
    assert later <= time.monotonic() - fresh.started


def test_stats_counts_the_downloads_resumed_at_start(tmp_path: Path) -> None:
    library = make_library(tmp_path)
    with running_daemon(library.config) as daemon, daemon.client() as client:
        add_torrent(client, new_payload(tmp_path), task_id="one")
        add_torrent(client, new_payload(tmp_path), task_id="two", paused=True)
        client.close()
        assert daemon.stop() == 0
    with running_daemon(library.config) as daemon, daemon.client() as client:
        assert client.call("stats")["resumed_at_start"] == 2


# --- durability: the change is in downloads.json when the ok arrives -------------------------


def test_add_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("durable-add")
    add_torrent(
        api,
        payload,
        task_id=task_id,
        name="Durable",
        file_priorities=[1, 0],
        peers=["127.0.0.1:1"],
        torrent_metadata={"k": "v"},
        validation_metadata={"n": 1},
    )
    entry = shared.library.state()[task_id]
    assert entry["info_hash"] == payload.info_hash
    assert entry["name"] == "Durable"
    assert entry["status"] == "queued"
    assert entry["file_priorities"] == [1, 0]
    assert entry["peers"] == ["127.0.0.1:1"]
    assert entry["torrent_metadata"] == {"k": "v"}
    assert entry["validation_metadata"] == {"n": 1}


def test_pause_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-pause")
    add_started(api, shared.library, new_payload(tmp_path), task_id)
    api.call("pause", task_id=task_id)
    assert shared.library.state()[task_id]["status"] == "paused"


def test_a_pause_right_after_add_is_not_undone_when_the_download_starts(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_ids = [new_id("pause-race") for _ in range(10)]
    for task_id in task_ids:
        add_torrent(api, new_payload(tmp_path), task_id=task_id)
        api.call("pause", task_id=task_id)
    # Started after them: once the daemon saved it as started, it has seen them start too.
    add_started(api, shared.library, new_payload(tmp_path), new_id("marker"))
    state = shared.library.state()
    assert {task_id: state[task_id]["status"] for task_id in task_ids} == dict.fromkeys(
        task_ids, "paused"
    )
    assert {t: api.call("get", task_id=t)["status"] for t in task_ids} == dict.fromkeys(
        task_ids, "paused"
    )


def test_resume_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-resume")
    add_torrent(api, new_payload(tmp_path), task_id=task_id, paused=True)
    api.call("resume", task_id=task_id)
    assert shared.library.state()[task_id]["status"] in {"queued", "downloading"}


def test_cancel_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-cancel")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    api.call("cancel", task_id=task_id)
    assert task_id not in shared.library.state()


def test_set_files_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    task_id = new_id("durable-files")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)
    api.call("set_files", task_id=task_id, file_priorities=[6, 2])
    assert shared.library.state()[task_id]["file_priorities"] == [6, 2]


def test_ack_is_in_the_state_file_when_its_ok_arrives(
    api: RawClient, shared: Served, tmp_path: Path
) -> None:
    payload = new_payload(tmp_path)
    task_id = new_id("durable-ack")
    with seeding_now(payload) as seeder:
        add_torrent(api, payload, task_id=task_id, peers=[seeder.peer])
        wait_status(api, task_id, "completed")
    assert shared.library.state()[task_id]["status"] == "completed"
    api.call("ack", task_id=task_id)
    assert task_id not in shared.library.state()


def test_bad_requests_leave_the_state_file_untouched(fresh: Served, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (fresh.library.downloads / "link").symlink_to(outside)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with fresh.client() as client:
        add_torrent(client, payload, task_id="kept", paused=True)
        before = fresh.library.state_file.read_bytes()
        bad_requests: list[tuple[str, dict[str, Any]]] = [
            ("add", {"torrent_b64": b64(payload.torrent), "task_id": "copycat"}),
            ("add", {"torrent_b64": b64(b"junk"), "task_id": "junk"}),
            ("add", {"torrent_b64": "!!", "task_id": "junk"}),
            ("add", {"torrent_path": str(fifo), "task_id": "fifo"}),
            ("add", {"torrent_path": "relative", "task_id": "relative"}),
            ("add", {"magnet": "magnet:?dn=x", "task_id": "magnet"}),
            ("add", {"magnet": "magnet:?xt=urn:btih:" + "b" * 40, "task_id": "a" * 65}),
            (
                "add",
                {
                    "torrent_b64": b64(new_payload(tmp_path).torrent),
                    "save_path": str(fresh.library.downloads / "link"),
                },
            ),
            (
                "add",
                {
                    "torrent_b64": b64(new_payload(tmp_path).torrent),
                    "file_priorities": [1],
                },
            ),
            ("pause", {"task_id": "missing"}),
            ("resume", {"task_id": "missing"}),
            ("cancel", {"task_id": "missing", "delete_files": True}),
            ("set_files", {"task_id": "kept", "file_priorities": [1, 1, 1]}),
            ("set_files", {"task_id": "kept", "file_priorities": [9, 9]}),
            ("ack", {"task_id": "kept"}),
            ("cancel", {"task_id": "kept", "delete_files": "yes"}),
            ("frobnicate", {"task_id": "kept"}),
        ]
        bad_lines = [b"garbage", b"[1]", b'{"op": 1}', b'{"id": true, "op": "add"}']
        bad_lines += [line({"op": op, **params}).rstrip() for op, params in bad_requests]
        for bad_line in bad_lines:
            client.send_raw(bad_line + b"\n")
            assert client.read_reply()["ok"] is False, bad_line
        with fresh.client() as cut_off:  # and an add that never got its newline
            cut_off.send_raw(line({"op": "add", "magnet": "magnet:?xt=urn:btih:" + "c" * 40})[:-1])
            assert hang_up_and_wait(cut_off) == b""
    assert fresh.library.state_file.read_bytes() == before


# --- events -------------------------------------------------------------------------------------


def test_the_subscribe_ok_comes_before_any_event(fresh: Served, tmp_path: Path) -> None:
    payload = new_payload(tmp_path)
    with fresh.client() as client, seeding_now(payload) as seeder:
        add_torrent(client, payload, task_id="done", peers=[seeder.peer])
        wait_status(client, "done", "completed")
    with fresh.client() as events:  # a completion is waiting for it: the ok still goes first
        events.send_raw(line({"id": 9, "op": "subscribe"}))
        assert events.read_message() == {"id": 9, "ok": True, "result": {}}
        assert events.read_message()["event"] == "download.completed"


def test_subscribers_receive_added_paused_resumed_and_removed_in_order(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("lifecycle")
    with subscribe(shared) as events:
        add_started(api, shared.library, new_payload(tmp_path), task_id)
        api.call("pause", task_id=task_id)
        api.call("resume", task_id=task_id)
        api.call("cancel", task_id=task_id)
        names = ["download.added", "download.paused", "download.resumed", "download.removed"]
        received = [wait_event(events, name, task_id) for name in names]
    for name, event in zip(names, received, strict=True):
        assert set(event) == {"event", "seq", "task_id"}
        assert event["event"] == name
    seqs = [event["seq"] for event in received]
    assert seqs == sorted(set(seqs))


def test_event_seq_increases_on_every_connection(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_ids = [new_id("seq") for _ in range(3)]
    with subscribe(shared) as first, subscribe(shared) as second:
        for task_id in task_ids:
            add_torrent(api, new_payload(tmp_path), task_id=task_id)
            api.call("pause", task_id=task_id)
        for events in (first, second):
            last = wait_event(events, "download.paused", task_ids[-1])  # the last one read
            seqs = [event["seq"] for event in [*events.events, last]]
            assert len(seqs) >= 6
            assert seqs == sorted(set(seqs))


def test_every_subscribe_first_receives_every_unacknowledged_completion(
    fresh: Served, tmp_path: Path
) -> None:
    payloads = [new_payload(tmp_path) for _ in range(3)]
    with fresh.client() as client, seeding_now(*payloads) as seeder:
        for index, payload in enumerate(payloads):
            add_torrent(client, payload, task_id=f"done-{index}", peers=[seeder.peer])
        for index in range(3):
            wait_status(client, f"done-{index}", "completed")
        add_torrent(client, new_payload(tmp_path), task_id="running")
    for _ in range(2):  # a second subscriber gets them again
        with subscribe(fresh) as events:
            first = [events.read_message() for _ in payloads]
        assert {event["event"] for event in first} == {"download.completed"}
        assert {event["task_id"] for event in first} == {"done-0", "done-1", "done-2"}
        assert all(set(event) == COMPLETED_EVENT_KEYS for event in first)


def test_an_acknowledged_completion_is_not_sent_to_later_subscribers(
    fresh: Served, tmp_path: Path
) -> None:
    payloads = [new_payload(tmp_path) for _ in range(2)]
    with fresh.client() as client, seeding_now(*payloads) as seeder:
        for index, payload in enumerate(payloads):
            add_torrent(client, payload, task_id=f"done-{index}", peers=[seeder.peer])
        for index in range(2):
            wait_status(client, f"done-{index}", "completed")
        client.call("ack", task_id="done-0")
        with subscribe(fresh) as events:
            add_torrent(client, new_payload(tmp_path), task_id="marker")
            # The backlog, then the live event: anything of done-0 would come in between.
            backlog, live = events.read_message(), events.read_message()
    assert (backlog["event"], backlog["task_id"]) == ("download.completed", "done-1")
    assert (live["event"], live["task_id"]) == ("download.added", "marker")


def test_an_unacknowledged_completion_is_sent_after_a_daemon_restart(
    tmp_path: Path,
) -> None:
    payload = new_payload(tmp_path)
    library = make_library(tmp_path)
    with running_daemon(library.config) as daemon, seeding_now(payload) as seeder:
        with daemon.client() as client:
            add_torrent(
                client, payload, task_id="done", peers=[seeder.peer], torrent_metadata={"id": 1}
            )
            wait_status(client, "done", "completed")
        assert daemon.stop() == 0
    with running_daemon(library.config) as daemon, daemon.client() as events:
        events.send_raw(line({"id": 1, "op": "subscribe"}))
        assert events.read_message() == {"id": 1, "ok": True, "result": {}}
        event = events.read_message()
    assert event["event"] == "download.completed"
    assert event["task_id"] == "done"
    assert event["torrent_metadata"] == {"id": 1}


def test_progress_events_are_sent_only_with_a_progress_interval(
    shared: Served, api: RawClient, tmp_path: Path
) -> None:
    task_id = new_id("progress")
    add_torrent(api, new_payload(tmp_path), task_id=task_id)  # no peers: it stays downloading
    with subscribe(shared, progress_interval=0.1) as with_progress, subscribe(shared) as without:
        for _ in range(3):
            progress = wait_event(with_progress, "download.progress", task_id, timeout=5.0)
        assert set(progress) == {
            "event",
            "seq",
            "task_id",
            "progress",
            "download_rate",
            "num_peers",
        }
        assert progress["progress"] == 0.0
        api.call("pause", task_id=task_id)  # a marker: everything before it has arrived
        wait_event(without, "download.paused", task_id)
        assert [e for e in without.events if e["event"] == "download.progress"] == []
