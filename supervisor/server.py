"""The message API's Unix socket: JSON lines in, replies and events out (CONTRACT section 2).

Every request runs in its own task, so many may be in flight on one connection and a slow one
never holds up the others; replies go out in the order they are ready. A line over 8 MiB is
answered `too_large` and the connection closed, having read no more than 8 MiB of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from actors.errors import BadRequest, ConfigError, DlkeeperError, TooLarge, error_body
from supervisor.api import ApiService, EventFeed

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 8 * 1024 * 1024
SOCKET_MODE = 0o660
# Requests in progress per connection; past this, the connection is not read (backpressure).
MAX_IN_FLIGHT = 256
# Replies still being worked on when a client closes its side get this long to go out.
DRAIN_TIMEOUT = 5.0


def open_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660 from the moment it exists.

    A stale socket file is replaced; the caller holds the state lock, so no other daemon of
    this library can be using it. Anything else at `path` is refused.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError("socket", f"{path} exists and is not a socket")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes bind() create the file without world (or execute) bits: no window
    # between bind and chmod in which anyone else could connect.
    previous = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError("socket", f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(previous)
    path.chmod(SOCKET_MODE)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ApiServer:
    """Accepts connections and serves each until it closes: it carries lines and events, and
    the `ApiService` decides what they mean."""

    def __init__(self, service: ApiService) -> None:
        self._service = service

    async def serve(self, path: Path, *, task_status: TaskStatus[None]) -> None:
        """Listens at `path` (started once listening) until cancelled; removes the socket."""
        listener = await SocketListener.from_socket(open_socket(path))
        try:
            task_status.started()
            await listener.serve(self._connection)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                with contextlib.suppress(FileNotFoundError):
                    await anyio.Path(path).unlink()

    async def _connection(self, stream: SocketStream) -> None:
        connection = _Connection(stream)
        async with stream, anyio.create_task_group() as tasks:
            connection.tasks = tasks
            await self._read_requests(connection)
            # The client closed its side: replies in progress still go out, then we hang up.
            with anyio.move_on_after(DRAIN_TIMEOUT):
                await connection.requests_done()
            tasks.cancel_scope.cancel()

    async def _read_requests(self, connection: _Connection) -> None:
        lines = BufferedByteReceiveStream(connection.stream)
        while True:
            try:
                # One byte over the limit, so that a line of exactly MAX_LINE_BYTES whose
                # newline comes in a later read is still whole.
                line: bytes | None = await lines.receive_until(b"\n", MAX_LINE_BYTES + 1)
            except anyio.DelimiterNotFound:
                line = None
            except (
                anyio.IncompleteRead,
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                return
            # receive_until also returns a line that grew past the limit in its last read.
            if line is None or len(line) > MAX_LINE_BYTES:
                error = TooLarge(f"a request line is longer than {MAX_LINE_BYTES} bytes")
                await connection.send(_error_reply(None, error))
                return
            await connection.request_slot()  # a client that never reads cannot pile up tasks
            connection.spawn_request(self._request, line)  # an empty line is bad_request too

    async def _request(self, connection: _Connection, line: bytes) -> None:
        request_id: Any = None
        try:
            request = _parse(line)
            op = _op(request)  # before the id: a line with no op is answered with id null
            request_id = _request_id(request)
            if op == "subscribe":
                self._subscribe(connection, request)
                await connection.send({"id": request_id, "ok": True, "result": {}})
                connection.subscribed.set()  # its events may go out now
                return
            result = await self._service.call(op, request)
            await connection.send({"id": request_id, "ok": True, "result": result})
        except DlkeeperError as error:
            await connection.send(_error_reply(request_id, error))
        except Exception as error:  # the daemon answers, whatever went wrong
            log.exception("request failed")
            await connection.send(_error_reply(request_id, error))

    def _subscribe(self, connection: _Connection, params: dict[str, Any]) -> None:
        """Takes the connection's event feed from the service; its events follow the `ok`."""
        feed = self._service.subscribe(params)
        if connection.feed is not None:
            raise BadRequest("this connection is already subscribed")
        feed.open()  # now, so that no live event falls in a gap before the `ok`
        connection.feed = feed
        connection.tasks.start_soon(self._stream, connection, feed)

    async def _stream(self, connection: _Connection, feed: EventFeed) -> None:
        await connection.subscribed.wait()  # the `ok` goes out before the first event
        try:
            await feed.run(connection.send)
        finally:
            feed.close()
        if feed.overflowed:
            log.warning("closing a connection whose subscriber fell behind")
            await connection.close()


class _Connection:
    """One client: its stream, a lock so lines never interleave, its requests in progress."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.tasks: TaskGroup
        self.feed: EventFeed | None = None
        self.subscribed = anyio.Event()
        self._in_progress = 0
        self._done = anyio.Event()
        self._slots = anyio.Semaphore(MAX_IN_FLIGHT)
        self._send_lock = anyio.Lock()

    def spawn_request(
        self, handle: Callable[[_Connection, bytes], Awaitable[None]], line: bytes
    ) -> None:
        self._in_progress += 1
        self.tasks.start_soon(self._run_request, handle, line)

    async def _run_request(
        self, handle: Callable[[_Connection, bytes], Awaitable[None]], line: bytes
    ) -> None:
        try:
            await handle(self, line)
        finally:
            self._slots.release()
            self._in_progress -= 1
            if self._in_progress == 0:
                self._done.set()
                self._done = anyio.Event()

    async def request_slot(self) -> None:
        """Waits while MAX_IN_FLIGHT requests of this connection are in progress."""
        await self._slots.acquire()

    async def requests_done(self) -> None:
        if self._in_progress:
            await self._done.wait()

    async def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message) + b"\n"
        try:
            async with self._send_lock:
                await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client is gone; its tasks end with the connection

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def _parse(line: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise BadRequest("the line is not JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("a request is a JSON object")
    return request


def _op(request: dict[str, Any]) -> str:
    op = request.pop("op", None)
    if not isinstance(op, str):
        raise BadRequest("a request needs an op (a string)")
    return op


def _request_id(request: dict[str, Any]) -> int | str | None:
    request_id = request.pop("id", None)
    if request_id is None or (
        isinstance(request_id, int | str) and not isinstance(request_id, bool)
    ):
        return request_id
    raise BadRequest("id must be an integer or a string")


def _error_reply(request_id: Any, error: BaseException) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": error_body(error)}
