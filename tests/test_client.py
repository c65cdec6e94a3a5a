"""The client against a real Unix-socket server that speaks the contract's wire format.

`running_daemon()` listens at a path in a temporary folder and hands every request line to the
test, which answers it (or not) when and how it likes: out of order, with an error, with events
in between, or by hanging up. Stopping it and starting another at the same path is a restart.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from actors.errors import (
    BadRequest,
    DlkeeperError,
    Duplicate,
    InvalidMagnet,
    InvalidTorrent,
    NoSpace,
    NotFound,
    NotReady,
    PathNotAllowed,
    TooLarge,
    UnknownOp,
)
from actors.messages.wire import (
    ApiEvent,
    DownloadCompletedEvent,
    DownloadProgressEvent,
    DownloadRemovedEvent,
)
from supervisor.client import (
    MAX_INLINE_TORRENT,
    DaemonNotRunning,
    DaemonUnavailable,
    DlkeeperClient,
    RequestError,
    RequestTimeout,
)

pytestmark = pytest.mark.anyio

TEST_DEADLINE = 3.0  # every test is over well within this; a hang fails fast
PONG = {"version": "0.1.0", "ready": True, "problems": []}  # a healthy daemon's ping result
LONG_TIMEOUT = 30.0  # a call that must fail long before this has failed promptly


# --- a fake daemon on a real socket -------------------------------------------------------------


class FakeConnection:
    """The daemon's end of one client connection."""

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._send_lock = anyio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._stream.send(orjson.dumps(message) + b"\n")

    async def send_event(self, event: dict[str, Any]) -> None:
        await self.send(event)

    async def hang_up(self) -> None:
        await self._stream.aclose()


@dataclass
class Received:
    """One request line the daemon read, and the connection it came on."""

    connection: FakeConnection
    request: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.request["op"])

    async def reply(self, result: dict[str, Any] | None = None) -> None:
        await self.connection.send({"id": self.request["id"], "ok": True, "result": result or {}})

    async def refuse(self, code: str, message: str, **extra: str | int) -> None:
        error = {"code": code, "message": message, **extra}
        await self.connection.send({"id": self.request["id"], "ok": False, "error": error})


class FakeDaemon:
    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []
        self._requests_send, self._requests_receive = anyio.create_memory_object_stream[Received](
            100
        )

    async def next_request(self) -> Received:
        return await self._requests_receive.receive()

    def close(self) -> None:
        self._requests_send.close()
        self._requests_receive.close()

    async def accept(self, listener: anyio.abc.SocketListener) -> None:
        async with anyio.create_task_group() as task_group:
            while True:
                stream = await listener.accept()
                task_group.start_soon(self._serve, stream)

    async def _serve(self, stream: SocketStream) -> None:
        connection = FakeConnection(stream)
        self.connections.append(connection)
        async with stream:
            lines = BufferedByteReceiveStream(stream)
            while True:
                try:
                    line = await lines.receive_until(b"\n", 16 * 1024 * 1024)
                except (anyio.IncompleteRead, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                await self._requests_send.send(Received(connection, orjson.loads(line)))


@asynccontextmanager
async def running_daemon(path: Path) -> AsyncIterator[FakeDaemon]:
    """A fake daemon listening at `path` until the block ends; then every connection is closed."""
    daemon = FakeDaemon()
    async with (
        await anyio.create_unix_listener(path) as listener,
        anyio.create_task_group() as task_group,
    ):
        task_group.start_soon(daemon.accept, listener)
        try:
            yield daemon
        finally:
            task_group.cancel_scope.cancel()
            daemon.close()


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Not tmp_path: a Unix socket path must stay under about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="dlk-") as directory:
        yield Path(directory) / "api.sock"


def download_info(task_id: str, status: str = "downloading") -> dict[str, Any]:
    return {
        "task_id": task_id,
        "name": f"{task_id}.mkv",
        "info_hash": "ab" * 20,
        "status": status,
        "progress": 0.5,
        "total_bytes": 1000,
        "downloaded_bytes": 500,
        "download_rate": 100,
        "upload_rate": 0,
        "num_peers": 2,
        "save_path": "/srv/media/downloads",
        "created_at": "2026-11-24T22:00:00Z",
        "completed_at": None,
        "error": None,
        "files": [{"path": f"{task_id}.mkv", "size": 1000, "priority": 4}],
    }


def completed_event(seq: int, task_id: str) -> dict[str, Any]:
    return {
        "event": "download.completed",
        "seq": seq,
        "task_id": task_id,
        "name": f"{task_id}.mkv",
        "info_hash": "ab" * 20,
        "save_path": "/srv/media/downloads",
        "files": [{"path": f"{task_id}.mkv", "size": 1000, "priority": 4}],
        "torrent_metadata": {"show": "x"},
        "validation_metadata": {},
        "completed_at": "2026-11-24T23:00:00Z",
    }


def progress_event(seq: int, task_id: str) -> dict[str, Any]:
    return {
        "event": "download.progress",
        "seq": seq,
        "task_id": task_id,
        "progress": 0.5,
        "download_rate": 100,
        "num_peers": 1,
    }


async def subscribed(
    client: DlkeeperClient, daemon: FakeDaemon, progress_interval: float | None = None
) -> Received:
    """Runs `client.subscribe()` and answers it; returns the subscribe request."""
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(client.subscribe, progress_interval)
        received = await daemon.next_request()
        assert received.op == "subscribe"
        await received.reply()
    return received


# --- requests and replies -----------------------------------------------------------------------


async def test_replies_out_of_order_reach_their_callers(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon, DlkeeperClient(socket_path) as client:
            results: dict[str, str] = {}

            async def get(task_id: str) -> None:
                results[task_id] = (await client.get(task_id)).name

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(get, "first")
                first = await daemon.next_request()
                task_group.start_soon(get, "second")
                second = await daemon.next_request()
                await second.reply(download_info(second.request["task_id"]))
                await first.reply(download_info(first.request["task_id"]))

    assert results == {"first": "first.mkv", "second": "second.mkv"}
    assert first.connection is second.connection
    assert isinstance(first.request["id"], int)
    assert isinstance(second.request["id"], int)
    assert first.request["id"] != second.request["id"]


async def test_add_sends_only_the_parameters_given(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path) as client,
            anyio.create_task_group() as task_group,
        ):
            task_group.start_soon(
                lambda: client.add(magnet="magnet:?xt=urn:btih:" + "ab" * 20, task_id="t1")
            )
            received = await daemon.next_request()
            await received.reply({"task_id": "t1", "info_hash": "ab" * 20, "status": "queued"})

    assert received.request == {
        "id": received.request["id"],
        "op": "add",
        "magnet": "magnet:?xt=urn:btih:" + "ab" * 20,
        "task_id": "t1",
    }


async def test_add_torrent_file_sends_the_file_as_base64(socket_path: Path, tmp_path: Path) -> None:
    torrent = tmp_path / "show.torrent"
    torrent.write_bytes(b"d4:infod6:lengthi1eee")
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon, DlkeeperClient(socket_path) as client:
            added = None

            async def add() -> None:
                nonlocal added
                added = await client.add_torrent_file(torrent, paused=True)

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(add)
                received = await daemon.next_request()
                await received.reply(
                    {"task_id": "made", "info_hash": "cd" * 20, "status": "paused"}
                )

    assert base64.b64decode(received.request["torrent_b64"]) == torrent.read_bytes()
    assert received.request["paused"] is True
    assert "torrent_path" not in received.request
    assert added is not None
    assert added.task_id == "made"


async def test_add_torrent_file_of_a_fifo_fails_at_once_and_sends_nothing(
    socket_path: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "show.torrent"
    os.mkfifo(fifo)  # no writer: a plain read would wait for good
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon, DlkeeperClient(socket_path) as client:
            with pytest.raises(OSError, match="is not a regular file"):
                await client.add_torrent_file(fifo)

    assert daemon.connections == []


async def test_add_torrent_file_sends_a_file_too_large_for_one_line_as_its_absolute_path(
    socket_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "huge.torrent").open("wb") as huge:
        huge.truncate(MAX_INLINE_TORRENT + 1)
    monkeypatch.chdir(tmp_path)
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path) as client,
            anyio.create_task_group() as task_group,
        ):
            task_group.start_soon(lambda: client.add_torrent_file("huge.torrent"))
            received = await daemon.next_request()
            await received.reply({"task_id": "made", "info_hash": "cd" * 20, "status": "queued"})

    assert received.request["torrent_path"] == str(tmp_path / "huge.torrent")
    assert "torrent_b64" not in received.request


async def test_list_returns_the_downloads_as_models(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon, DlkeeperClient(socket_path) as client:
            downloads = []

            async def list_downloads() -> None:
                downloads.extend(await client.list())

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(list_downloads)
                received = await daemon.next_request()
                await received.reply(
                    {"downloads": [download_info("a"), download_info("b", "completed")]}
                )

    assert [(info.task_id, info.status) for info in downloads] == [
        ("a", "downloading"),
        ("b", "completed"),
    ]


async def test_duplicate_error_carries_code_message_and_existing_task_id(
    socket_path: Path,
) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path) as client,
            anyio.create_task_group() as task_group,
        ):

            async def add() -> None:
                with pytest.raises(Duplicate) as raised:
                    await client.add(magnet="magnet:?xt=urn:btih:" + "ab" * 20, task_id="new")
                error = raised.value
                assert error.code == "duplicate"
                assert error.task_id == "old"
                assert isinstance(error, RequestError)
                assert error.message == "this torrent is already downloading as old"
                assert str(error) == error.message

            task_group.start_soon(add)
            received = await daemon.next_request()
            await received.refuse(
                "duplicate", "this torrent is already downloading as old", task_id="old"
            )


async def test_no_space_error_carries_the_needed_and_free_bytes(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path) as client,
            anyio.create_task_group() as task_group,
        ):

            async def add() -> None:
                with pytest.raises(NoSpace) as raised:
                    await client.add(magnet="magnet:?xt=urn:btih:" + "cd" * 20)
                error = raised.value
                assert error.code == "no_space"
                assert (error.needed_bytes, error.free_bytes) == (5_000_000, 1_000_000)
                assert error.message == "the download needs more than is free"

            task_group.start_soon(add)
            await (await daemon.next_request()).refuse(
                "no_space",
                "the download needs more than is free",
                needed_bytes=5_000_000,
                free_bytes=1_000_000,
            )


async def test_ping_and_stats_carry_the_problems_and_the_free_bytes(socket_path: Path) -> None:
    problem = "the file system of /srv/media/downloads has 0 bytes free, it is full"
    stats_result = {
        "downloads": {"downloading": 1},
        "resumed_at_start": 1,
        "resume_failures": 0,
        "worker_restarts": 0,
        "uptime": 12.5,
        "problems": [problem],
    }
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon, DlkeeperClient(socket_path) as client:
            async with anyio.create_task_group() as task_group:

                async def ping() -> None:
                    assert (await client.ping()).problems == (problem,)

                task_group.start_soon(ping)
                await (await daemon.next_request()).reply({**PONG, "problems": [problem]})
            for free_bytes in (0, 7_000_000_000, None):
                async with anyio.create_task_group() as task_group:

                    async def stats(expected: int | None = free_bytes) -> None:
                        stats = await client.stats()
                        assert (stats.problems, stats.free_bytes) == ((problem,), expected)

                    task_group.start_soon(stats)
                    received = await daemon.next_request()
                    await received.reply({**stats_result, "free_bytes": free_bytes})


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        ("bad_request", BadRequest),
        ("unknown_op", UnknownOp),
        ("not_found", NotFound),
        ("invalid_torrent", InvalidTorrent),
        ("invalid_magnet", InvalidMagnet),
        ("path_not_allowed", PathNotAllowed),
        ("too_large", TooLarge),
        ("not_ready", NotReady),
        ("no_space", NoSpace),
        ("internal", RequestError),
    ],
)
async def test_error_reply_raises_the_class_of_its_code(
    socket_path: Path, code: str, error_class: type[DlkeeperError]
) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path) as client,
            anyio.create_task_group() as task_group,
        ):

            async def pause() -> None:
                with pytest.raises(error_class) as raised:
                    await client.pause("abc123")
                assert raised.value.code == code
                assert isinstance(raised.value, RequestError)
                assert raised.value.message == "the daemon says no"
                if isinstance(raised.value, NotFound):
                    assert raised.value.task_id == "abc123"

            task_group.start_soon(pause)
            await (await daemon.next_request()).refuse(code, "the daemon says no")


async def test_unanswered_request_times_out_and_the_connection_stays_usable(
    socket_path: Path,
) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path, request_timeout=0.2) as client,
        ):
            async with anyio.create_task_group() as task_group:

                async def stats() -> None:
                    with pytest.raises(RequestTimeout, match="stats"):
                        await client.stats()

                task_group.start_soon(stats)
                ignored = await daemon.next_request()

            async with anyio.create_task_group() as task_group:
                task_group.start_soon(client.ping)
                ping = await daemon.next_request()
                await ignored.reply({"downloads": {}})  # too late: dropped by the client
                await ping.reply(PONG)

    assert ping.connection is ignored.connection


async def test_oversized_request_is_refused_before_it_is_sent(socket_path: Path) -> None:
    # No daemon at all: a refusal that does not come from a connection was never sent.
    with anyio.fail_after(TEST_DEADLINE):
        async with DlkeeperClient(socket_path, connect_timeout=0.1) as client:
            with pytest.raises(TooLarge):
                await client.add(torrent_b64="A" * (9 * 1024 * 1024))


# --- events -------------------------------------------------------------------------------------


async def test_events_interleaved_with_replies_reach_the_iterator(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon, DlkeeperClient(socket_path) as client:
            subscribe = await subscribed(client, daemon, progress_interval=2.0)
            events = client.events()
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(client.cancel, "c1")
                cancel = await daemon.next_request()
                await cancel.connection.send_event(progress_event(1, "p1"))
                await cancel.connection.send_event(
                    {"event": "download.removed", "seq": 2, "task_id": "c1"}
                )
                await cancel.reply()
                await cancel.connection.send_event(completed_event(3, "d1"))
            received = [await anext(events) for _ in range(3)]

    assert subscribe.request["progress_interval"] == 2.0
    assert cancel.request == {
        "id": cancel.request["id"],
        "op": "cancel",
        "task_id": "c1",
        "delete_files": False,
    }
    assert [event.seq for event in received] == [1, 2, 3]
    assert isinstance(received[0], DownloadProgressEvent)
    assert isinstance(received[1], DownloadRemovedEvent)
    assert isinstance(received[2], DownloadCompletedEvent)
    assert received[2].torrent_metadata == {"show": "x"}


async def test_progress_events_are_dropped_while_the_queue_is_half_full(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path, event_buffer=4) as client,
        ):
            subscribe = await subscribed(client, daemon, progress_interval=1.0)
            for seq in range(1, 5):
                await subscribe.connection.send_event(progress_event(seq, "p1"))
            await subscribe.connection.send_event(completed_event(5, "d1"))
            async with anyio.create_task_group() as task_group:
                # The ping's reply comes after every event: once it is in, they all were read.
                task_group.start_soon(client.ping)
                await (await daemon.next_request()).reply(PONG)
            events = client.events()
            received = [await anext(events) for _ in range(3)]

    assert [(event.event, event.seq) for event in received] == [
        ("download.progress", 1),
        ("download.progress", 2),
        ("download.completed", 5),
    ]


async def test_subscribing_again_sends_nothing_and_another_interval_is_refused(
    socket_path: Path,
) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path) as client,
            anyio.create_task_group() as task_group,
        ):
            await subscribed(client, daemon, progress_interval=1.0)
            await client.subscribe(progress_interval=1.0)
            with pytest.raises(RuntimeError, match=r"progress_interval=1\.0"):
                await client.subscribe(progress_interval=2.0)
            task_group.start_soon(client.ping)
            ping = await daemon.next_request()
            await ping.reply(PONG)

    assert ping.op == "ping"  # the first request after the subscribe: no second subscribe


# --- losing the daemon --------------------------------------------------------------------------


async def test_call_without_a_daemon_raises_daemon_not_running_naming_the_socket(
    socket_path: Path,
) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with DlkeeperClient(socket_path, connect_timeout=0.3) as client:
            with pytest.raises(DaemonNotRunning) as raised:
                await client.ping()

    assert str(socket_path) in str(raised.value)
    assert "is the service running?" in str(raised.value)
    assert raised.value.socket_path == socket_path


async def test_an_error_leaving_the_client_block_is_raised_as_itself_not_in_a_group(
    socket_path: Path,
) -> None:
    # What a bot writes: `except DaemonUnavailable` around the whole `async with`.
    with anyio.fail_after(TEST_DEADLINE), pytest.raises(DaemonUnavailable) as raised:
        async with DlkeeperClient(socket_path, connect_timeout=0.3) as client:
            await client.ping()

    assert raised.value.socket_path == socket_path


async def test_connection_closed_mid_request_fails_the_call_promptly(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with (
            running_daemon(socket_path) as daemon,
            DlkeeperClient(socket_path, request_timeout=LONG_TIMEOUT) as client,
            anyio.create_task_group() as task_group,
        ):

            async def get() -> None:
                with pytest.raises(DaemonUnavailable) as raised:
                    await client.get("abc123")
                assert not isinstance(raised.value, RequestTimeout)
                assert str(socket_path) in str(raised.value)

            task_group.start_soon(get)
            received = await daemon.next_request()
            await received.connection.hang_up()


async def test_call_after_a_daemon_restart_reconnects(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with DlkeeperClient(socket_path) as client:
            for _ in range(2):  # the second daemon is the first one restarted
                async with (
                    running_daemon(socket_path) as daemon,
                    anyio.create_task_group() as task_group,
                ):
                    task_group.start_soon(client.ping)
                    received = await daemon.next_request()
                    await received.reply(PONG)
                    assert received.op == "ping"  # not a subscribe: there was none to renew


async def test_daemon_restart_renews_the_subscription_and_events_go_on(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with DlkeeperClient(socket_path) as client:
            async with running_daemon(socket_path) as daemon:
                await subscribed(client, daemon, progress_interval=1.5)
                events = client.events()
                await daemon.connections[0].send_event(completed_event(1, "d1"))
                before = await anext(events)

            async with running_daemon(socket_path) as restarted:
                after: list[ApiEvent] = []
                async with anyio.create_task_group() as task_group:

                    async def read_two() -> None:
                        after.append(await anext(events))
                        after.append(await anext(events))

                    task_group.start_soon(read_two)
                    resubscribe = await restarted.next_request()
                    assert resubscribe.op == "subscribe"
                    assert resubscribe.request["progress_interval"] == 1.5
                    await resubscribe.reply()
                    # A new daemon lifetime: the unacknowledged completion comes again.
                    await resubscribe.connection.send_event(completed_event(1, "d1"))
                    await resubscribe.connection.send_event(completed_event(2, "d2"))

    assert isinstance(before, DownloadCompletedEvent)
    assert before.task_id == "d1"
    assert [(event.event, event.task_id) for event in after] == [
        ("download.completed", "d1"),
        ("download.completed", "d2"),
    ]


async def test_events_iterator_ends_when_the_client_closes(socket_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE):
        async with running_daemon(socket_path) as daemon:
            async with DlkeeperClient(socket_path) as client:
                await subscribed(client, daemon)
                events = client.events()
            assert [event async for event in events] == []
