"""The message API's Unix socket: JSON lines in, replies and events out (CONTRACT section 2).

Every request runs in its own task, so many may be in flight on one connection and a slow one
never holds up the others; replies go out in the order they are ready. A line over 8 MiB is
answered `too_large` and the connection closed, having read no more than 8 MiB of it.

Memory for requests in flight is bounded in bytes as well as in number: every request line is
charged to one byte budget shared by all connections (`LINE_BYTES_IN_FLIGHT`) from when it is
read until its answer is known, together with what the service charges while serving it (a
.torrent). While the budget is spent, each connection's reader stops reading (the
backpressure), and the requests already admitted finish and give their bytes back; the reply
goes out after, so a client slow to read its replies holds nothing.

The server holds at most `connection_cap()` connections, so that idle clients can never take the
descriptors the state file needs; one more is answered `not_ready` and closed. A failed
`accept()` is retried after a short pause, never the end of the server. The socket file is this
daemon's alone: one that another process answers on is refused, a stale one replaced, and at
stop only the file this daemon created is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from actors.budget import ByteBudget, HeldBytes
from actors.errors import (
    BadRequest,
    ConfigError,
    DlkeeperError,
    NotReady,
    SocketInUse,
    TooLarge,
    error_body,
)
from supervisor.api import ApiService, EventFeed

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 8 * 1024 * 1024
SOCKET_MODE = 0o660
# Requests in progress per connection; past this, the connection is not read (backpressure).
MAX_IN_FLIGHT = 256
# Bytes of request lines in progress, all connections together; past this, lines wait to be
# admitted. Four lines of the largest size, or thousands of ordinary ones: on a Raspberry Pi,
# with the .torrent budget (supervisor.api), a few hundred MiB at worst rather than gigabytes.
LINE_BYTES_IN_FLIGHT = 32 * 1024 * 1024
# Replies still being worked on when a client closes its side get this long to go out.
DRAIN_TIMEOUT = 5.0
# Descriptors left free beyond the connections: the state file's writes (temporary file,
# folder), a restarted worker's pipes, .torrent reads, systemd notices, refusals.
DESCRIPTOR_RESERVE = 64
# However many descriptors there are: a bot needs a few connections, and each costs memory.
MAX_CONNECTIONS = 1024
# A refused connection is closed when its client hangs up, or after this; no more than so
# many wait at once (the others are closed at once), so that refusals never use up the reserve.
REFUSAL_LINGER = 1.0
MAX_LINGERING_REFUSALS = 16
# A failed accept() (out of descriptors, say) is retried after this, doubling up to the maximum.
ACCEPT_RETRY = 0.05
ACCEPT_RETRY_MAX = 1.0
# How long a daemon that finds a socket at its path waits for whoever holds it to answer.
PROBE_TIMEOUT = 1.0
# How long opening or removing the socket waits for another daemon doing the same.
FOLDER_LOCK_TIMEOUT = 5.0


@dataclass(frozen=True)
class ListeningSocket:
    """A listening socket, and the device and inode of the file bind() made for it: what tells
    this daemon's socket file from one another daemon put at the same path later."""

    socket: socket.socket
    identity: tuple[int, int]


def open_socket(path: Path) -> ListeningSocket:
    """A listening Unix socket at `path`, mode 0660 from the moment it exists.

    A socket file no one listens on (connect() refused) is replaced. One that answers belongs
    to another daemon, maybe of another library, and is refused with `SocketInUse`; anything
    that is not a socket, with `ConfigError`. Blocks (a probe, a lock): run it in a thread.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("socket", f"cannot make {path.parent}: {exc.strerror or exc}") from None
    with _folder_locked(path.parent):
        if _stale_socket_at(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
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
        made = path.lstat()
        path.chmod(SOCKET_MODE)
        sock.listen(128)
    sock.setblocking(False)
    return ListeningSocket(sock, (made.st_dev, made.st_ino))


async def check_socket_free(path: Path) -> None:
    """Raises `SocketInUse` when another process answers on `path` and `ConfigError` when
    something that is not a socket is there: said at start, before the library is replayed,
    rather than once the daemon is ready to open its socket."""
    await anyio.to_thread.run_sync(_stale_socket_at, path)


def remove_socket(path: Path, identity: tuple[int, int]) -> None:
    """Removes the socket file at `path` if it is still the one with `identity`; a file another
    daemon has put there since is left alone. Call it before closing the listening socket, so
    that its file's inode cannot have been reused."""
    try:
        with _folder_locked(path.parent):
            try:
                found = path.lstat()
            except FileNotFoundError:
                return
            if (found.st_dev, found.st_ino) != identity:
                log.warning("leaving %s in place: it is no longer this daemon's socket", path)
                return
            path.unlink()
    except (OSError, SocketInUse) as exc:
        log.warning("cannot remove the socket %s: %s", path, exc)


def connection_cap(limit: int, open_now: int) -> int:
    """How many connections the server holds at once: what the descriptor limit leaves after
    the `open_now` descriptors and `DESCRIPTOR_RESERVE`, at least 4 and at most
    `MAX_CONNECTIONS`."""
    return max(4, min(MAX_CONNECTIONS, limit - open_now - DESCRIPTOR_RESERVE))


def descriptor_limit() -> int:
    """This process's limit on open descriptors (the soft RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_CONNECTIONS * 2 if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """How many descriptors this process has open (an estimate where /proc is missing)."""
    try:
        # Less the one that reading the folder opens.
        return sum(1 for _ in Path("/proc/self/fd").iterdir()) - 1
    except OSError:
        return 32


def _stale_socket_at(path: Path) -> bool:
    """Whether `path` holds a socket file no one listens on; False when nothing is there.
    Raises when another process answers there, or when it is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError("socket", f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError("socket", f"{path} exists and is not a socket")
    who = _who_answers(path)
    if who is None:
        return True
    raise SocketInUse(
        f"{who} answers on {path}; stop it, or give this daemon a socket of its own "
        "(socket in its config, or --socket)"
    )


def _who_answers(path: Path) -> str | None:
    """None when connect() to `path` is refused (a stale file) or finds nothing; else who is
    there: "another dlkeeper" when it answers a ping as one does, else "another process"."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except BlockingIOError:
            return "another process (its queue of connections is full)"
        except OSError as exc:
            raise SocketInUse(
                f"cannot tell whether another process answers on {path} "
                f"({exc.strerror or exc}); remove it if none does"
            ) from None
        return "another dlkeeper" if _answers_ping(probe) else "another process"


def _answers_ping(probe: socket.socket) -> bool:
    received = b""
    try:
        probe.sendall(b'{"id": "socket-probe", "op": "ping"}\n')
        while b"\n" not in received and len(received) < 65536:
            chunk = probe.recv(65536)
            if not chunk:
                break
            received += chunk
    except OSError:
        pass
    try:
        reply = orjson.loads(received.split(b"\n", 1)[0])
    except orjson.JSONDecodeError:
        return False
    return isinstance(reply, dict) and "ok" in reply


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on the socket's folder itself, so that two daemons never
    interleave checking, replacing or removing a socket file there. A folder that cannot be
    opened for it is used unlocked: the lock only closes a race between two starts."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + FOLDER_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SocketInUse(
                        f"another process keeps the socket folder {folder} locked"
                    ) from None
                time.sleep(0.01)  # in a worker thread: polling a lock, under a deadline
        yield
    finally:
        os.close(descriptor)  # releases the lock


class ApiServer:
    """Accepts connections and serves each until it closes: it carries lines and events, and
    the `ApiService` decides what they mean."""

    def __init__(self, service: ApiService) -> None:
        self._service = service
        self._line_bytes = ByteBudget(LINE_BYTES_IN_FLIGHT)
        self._open_connections = 0
        self._cap = MAX_CONNECTIONS
        self._refused = 0  # since the server last accepted one
        self._lingering = 0  # refused connections not yet closed

    async def serve(self, path: Path, *, task_status: TaskStatus[None]) -> None:
        """Listens at `path` (started once listening) until cancelled; removes the socket if it
        is still this daemon's. Raises `SocketInUse` when another process answers there."""
        opened = await anyio.to_thread.run_sync(open_socket, path)
        listener = await SocketListener.from_socket(opened.socket)
        limit, open_now = descriptor_limit(), open_descriptors()
        self._cap = connection_cap(limit, open_now)
        log.info(
            "serving at most %d connections at once (%d descriptors allowed, %d open)",
            self._cap,
            limit,
            open_now,
        )
        try:
            async with anyio.create_task_group() as connections:
                task_status.started()
                await self._accept(listener, connections)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_socket, path, opened.identity)
                await listener.aclose()

    async def _accept(self, listener: SocketListener, connections: TaskGroup) -> None:
        """Accepts connections until cancelled: a failed accept() is said once and retried
        after a pause, a connection past the cap is refused."""
        failures = 0
        while True:
            try:
                stream = await listener.accept()
            except anyio.BrokenResourceError as exc:
                if failures == 0:
                    reason = exc.__cause__ or exc
                    log.warning("cannot accept connections (%s): retrying", _describe(reason))
                await anyio.sleep(min(ACCEPT_RETRY * 2**failures, ACCEPT_RETRY_MAX))
                failures += 1
                continue
            if failures:
                log.info("accepting connections again, after %d failed attempts", failures)
                failures = 0
            if self._open_connections >= self._cap:
                self._refuse(stream, connections)
                continue
            if self._refused:
                log.info("accepting connections again, after refusing %d", self._refused)
                self._refused = 0
            self._open_connections += 1
            connections.start_soon(self._counted_connection, stream)

    async def _counted_connection(self, stream: SocketStream) -> None:
        try:
            await self._connection(stream)
        finally:
            self._open_connections -= 1

    def _refuse(self, stream: SocketStream, connections: TaskGroup) -> None:
        """Answers one line, `not_ready`, and ends the stream: the client learns why at once.
        The connection stays open a moment, until the client closes it, so that a request
        it sends meanwhile does not fail with a broken pipe before it reads the refusal."""
        if self._refused == 0:
            log.warning("refusing connections: %d are open, the most this daemon serves", self._cap)
        self._refused += 1
        error = NotReady(
            f"dlkeeper serves at most {self._cap} connections at once and all are in use; "
            "retry once one closes"
        )
        raw = stream.extra(SocketAttribute.raw_socket)
        with contextlib.suppress(OSError):
            raw.send(orjson.dumps(_error_reply(None, error)) + b"\n")  # a new socket takes it
            raw.shutdown(socket.SHUT_WR)
        if self._lingering < MAX_LINGERING_REFUSALS:
            self._lingering += 1
            connections.start_soon(self._linger, stream)
        else:
            connections.start_soon(stream.aclose)

    async def _linger(self, stream: SocketStream) -> None:
        """Reads (and drops) what a refused client sends, until it hangs up or for at most
        REFUSAL_LINGER seconds, then closes."""
        try:
            with anyio.move_on_after(REFUSAL_LINGER):
                while len(await stream.receive()) > 0:
                    pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self._lingering -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _connection(self, stream: SocketStream) -> None:
        connection = _Connection(stream)
        try:
            async with stream, anyio.create_task_group() as tasks:
                connection.tasks = tasks
                await self._read_requests(connection)
                # The client closed its side: replies in progress still go out, then we hang up.
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    await connection.requests_done()
                tasks.cancel_scope.cancel()
        finally:
            connection.release_charges()  # of requests cancelled before they ever ran

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
            held = HeldBytes()
            await held.take(self._line_bytes, len(line))  # meanwhile this connection is not read
            # An empty line is bad_request too.
            connection.spawn_request(self._request, _Request(line, held))
            del line  # the request has it: an idle reader keeps none of it after the answer

    async def _request(self, connection: _Connection, request: _Request) -> None:
        try:
            # The service charges what else the request holds (a .torrent) to `request.held`.
            with request.held.serving():
                # The line goes to _answer alone, so nothing of it is left once it answers.
                reply, subscribed = await self._answer(connection, request.take_line())
        finally:
            request.held.release()  # before the reply: a client slow to read it holds nothing
        await connection.send(reply)
        if subscribed:
            connection.subscribed.set()  # its events may go out now

    async def _answer(self, connection: _Connection, line: bytes) -> tuple[dict[str, Any], bool]:
        """The reply to one request line, and whether it subscribed the connection."""
        request_id: Any = None
        try:
            request = _parse(line)
            op = _op(request)  # before the id: a line with no op is answered with id null
            request_id = _request_id(request)
            if op == "subscribe":
                self._subscribe(connection, request)
                return {"id": request_id, "ok": True, "result": {}}, True
            result = await self._service.call(op, request)
            return {"id": request_id, "ok": True, "result": result}, False
        except DlkeeperError as error:
            return _error_reply(request_id, error), False
        except Exception as error:  # the daemon answers, whatever went wrong
            log.exception("request failed")
            return _error_reply(request_id, error), False

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


class _Request:
    """A request line read and admitted, and the bytes held for it: its line, and what the
    service adds while serving it."""

    def __init__(self, line: bytes, held: HeldBytes) -> None:
        self._line: bytes | None = line
        self.held = held

    def take_line(self) -> bytes:
        """The line, which this object then no longer keeps."""
        line, self._line = self._line, None
        assert line is not None, "a request line is taken once"
        return line


class _Connection:
    """One client: its stream, a lock so lines never interleave, its requests in progress."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.tasks: TaskGroup
        self.feed: EventFeed | None = None
        self.subscribed = anyio.Event()
        self._in_progress = 0
        self._requests: set[_Request] = set()
        self._done = anyio.Event()
        self._slots = anyio.Semaphore(MAX_IN_FLIGHT)
        self._send_lock = anyio.Lock()

    def spawn_request(
        self, handle: Callable[[_Connection, _Request], Awaitable[None]], request: _Request
    ) -> None:
        self._in_progress += 1
        self._requests.add(request)
        self.tasks.start_soon(self._run_request, handle, request)

    async def _run_request(
        self, handle: Callable[[_Connection, _Request], Awaitable[None]], request: _Request
    ) -> None:
        try:
            await handle(self, request)
        finally:
            request.held.release()
            self._requests.discard(request)
            self._slots.release()
            self._in_progress -= 1
            if self._in_progress == 0:
                self._done.set()
                self._done = anyio.Event()

    async def request_slot(self) -> None:
        """Waits while MAX_IN_FLIGHT requests of this connection are in progress."""
        await self._slots.acquire()

    def release_charges(self) -> None:
        """Gives back the bytes held for every request that has not: a task cancelled before
        it started never ran its own `finally`."""
        for request in self._requests:
            request.held.release()
        self._requests.clear()

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


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror}"
    return str(error) or type(error).__name__
