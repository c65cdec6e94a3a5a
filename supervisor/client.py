"""The typed async client the bot imports: one method per op of the message API (CONTRACT.md
section 2), errors as exceptions carrying the contract's code, events as an async iterator.

    async with DlkeeperClient("/run/dlkeeper/api.sock") as client:
        added = await client.add(magnet=link, task_id="show-s01e01")
        await client.subscribe()
        async for event in client.events():
            if isinstance(event, DownloadCompletedEvent):
                await import_into_library(event)  # must be idempotent, see below
                await client.ack(event.task_id)

Entering the client connects nothing; the first call does, and so does every call after the
connection dropped (a daemon restart): it retries with backoff, 0.1 s doubling to 5 s, for up to
`connect_timeout` seconds, then raises `DaemonUnavailable`. A call in flight when the connection
drops fails at once with `DaemonUnavailable`; it may or may not have been applied, and every op is
safe to retry (an `add` with the same `task_id` returns the existing download). No call takes
longer than `request_timeout`.

After `subscribe()`, every new connection subscribes again by itself, so `events()` keeps yielding
across daemon restarts. The daemon re-sends every unacknowledged `download.completed` and
`download.failed` on each subscribe: the same completion may arrive twice (across a restart, or
when the bot crashed before its `ack`). Treat events idempotently, and `ack` a download only once
its files are imported.
"""

from __future__ import annotations

import base64
import builtins
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
import orjson
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from pydantic import BaseModel, ValidationError

from actors.errors import (
    BadRequest,
    DaemonNotRunning,
    DaemonUnavailable,
    DlkeeperError,
    Duplicate,
    InvalidMagnet,
    InvalidTorrent,
    NoSpace,
    NotFound,
    NotReady,
    PathNotAllowed,
    ProtocolError,
    RequestError,
    RequestTimeout,
    TooLarge,
    UnknownOp,
    error_from_body,
    leaves,
)
from actors.messages.wire import (
    API_EVENTS,
    AddResult,
    ApiError,
    ApiEvent,
    ApiReply,
    DownloadAddedEvent,
    DownloadCompletedEvent,
    DownloadFailedEvent,
    DownloadInfo,
    DownloadPausedEvent,
    DownloadProgressEvent,
    DownloadRemovedEvent,
    DownloadResumedEvent,
    FileInfo,
    ListResult,
    PingResult,
    StatsResult,
)

# What the bot needs, in one import: the client, its errors, and the models it returns.
__all__ = [
    "AddResult",
    "ApiEvent",
    "BadRequest",
    "DaemonNotRunning",
    "DaemonUnavailable",
    "DlkeeperClient",
    "DlkeeperError",
    "DownloadAddedEvent",
    "DownloadCompletedEvent",
    "DownloadFailedEvent",
    "DownloadInfo",
    "DownloadPausedEvent",
    "DownloadProgressEvent",
    "DownloadRemovedEvent",
    "DownloadResumedEvent",
    "Duplicate",
    "FileInfo",
    "InvalidMagnet",
    "InvalidTorrent",
    "NoSpace",
    "NotFound",
    "NotReady",
    "PathNotAllowed",
    "PingResult",
    "ProtocolError",
    "RequestError",
    "RequestTimeout",
    "StatsResult",
    "TooLarge",
    "UnknownOp",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_SOCKET = Path("/run/dlkeeper/api.sock")
RECONNECT_DELAY_FIRST = 0.1
RECONNECT_DELAY_MAX = 5.0
MAX_REQUEST_LINE = 8 * 1024 * 1024  # the daemon answers a longer line with too_large and hangs up
MAX_REPLY_LINE = 256 * 1024 * 1024  # a `list` of many downloads with many files is long
# The largest .torrent `add_torrent_file` sends as its content: its base64 must fit in one line.
MAX_INLINE_TORRENT = 6 * 1024 * 1024


def _request_error(error: ApiError, request_task_id: str | None) -> RequestError:
    # A not_found names no download on the wire: it is the one the request named.
    task_id = error.task_id or (request_task_id if error.code == "not_found" else None)
    return error_from_body(
        error.code,
        error.message,
        task_id,
        needed_bytes=error.needed_bytes,
        free_bytes=error.free_bytes,
    )


# --- one connection -----------------------------------------------------------------------------


class _OneShot(Generic[T]):
    """An answer awaited by other tasks: set once, with a value or with an error to raise.

    The error is a factory: one instance raised in many tasks piles up their tracebacks.
    """

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._outcome: tuple[T] | Callable[[], BaseException] | None = None

    def set(self, value: T) -> None:
        if self._outcome is None:
            self._outcome = (value,)
            self._done.set()

    def fail(self, error: Callable[[], BaseException]) -> None:
        if self._outcome is None:
            self._outcome = error
            self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if isinstance(self._outcome, tuple):
            return self._outcome[0]
        assert self._outcome is not None
        raise self._outcome()


@dataclass(frozen=True)
class _Subscription:
    progress_interval: float | None

    def params(self) -> dict[str, object]:
        if self.progress_interval is None:
            return {}
        return {"progress_interval": self.progress_interval}


class _ConnectionLost:
    """Put in the event queue when a subscribed connection ends, to wake the event iterator."""


_EventQueueItem = ApiEvent | _ConnectionLost


class _Connection:
    """One socket to the daemon: sends request lines, and its reader task hands each reply to
    the request with its `id` and each event to the client's event queue."""

    def __init__(
        self,
        stream: SocketStream,
        socket_path: Path,
        events: MemoryObjectSendStream[_EventQueueItem],
    ) -> None:
        self._stream = stream
        self._socket_path = socket_path
        self._events = events
        self._pending: dict[int, _OneShot[ApiReply]] = {}
        self._send_lock = anyio.Lock()
        self._reader_scope = anyio.CancelScope()
        self._failure: str | None = None
        self._error_without_id: ApiError | None = None
        self.subscription: _Subscription | None = None

    @property
    def alive(self) -> bool:
        return self._failure is None

    async def request(self, request_id: int, line: bytes) -> ApiReply:
        """Sends one request line and waits for the reply with its id."""
        if self._failure is not None:
            raise self._lost()
        slot = _OneShot[ApiReply]()
        self._pending[request_id] = slot
        try:
            await self._send(line)
            return await slot.wait()
        finally:
            self._pending.pop(request_id, None)

    def abort(self, reason: str) -> None:
        """Ends the connection now: every request waiting on it fails with `reason`."""
        self._fail(reason)
        self._reader_scope.cancel()

    async def read_replies(self) -> None:
        """The reader task: runs until the connection ends, then fails what still waits."""
        reason = "the client was closed"
        try:
            with self._reader_scope:
                reason = await self._read_until_end()
        finally:
            self._fail(reason)
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
        if self.subscription is not None:
            with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._events.send(_ConnectionLost())

    async def _send(self, line: bytes) -> None:
        async with self._send_lock:
            if self._failure is not None:
                raise self._lost()
            try:
                await self._stream.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.abort(f"sending failed ({_describe(exc)})")
                raise self._lost() from exc
            except anyio.get_cancelled_exc_class():
                # The socket may now hold half a line, which would garble every later request.
                self.abort("a request was cancelled halfway through being sent")
                raise

    async def _read_until_end(self) -> str:
        lines = BufferedByteReceiveStream(self._stream)
        while True:
            try:
                line = await lines.receive_until(b"\n", MAX_REPLY_LINE)
            except anyio.IncompleteRead:
                if self._error_without_id is not None:
                    error = self._error_without_id
                    return f"the daemon hung up after answering {error.code}: {error.message}"
                return "the daemon closed the connection"
            except anyio.DelimiterNotFound:
                return f"the daemon sent a line longer than {MAX_REPLY_LINE} bytes"
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                return f"the connection broke ({_describe(exc)})"
            problem = await self._handle_line(line)
            if problem is not None:
                return problem

    async def _handle_line(self, line: bytes) -> str | None:
        """Delivers one line; returns why the connection must end, if it must."""
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            return "the daemon sent a line that is not JSON"
        if not isinstance(message, dict):
            return "the daemon sent a line that is not a JSON object"
        if "event" in message:
            try:
                event: ApiEvent = API_EVENTS.validate_python(message)
            except ValidationError as exc:
                # A newer daemon's event: skipping it keeps the connection and the rest usable.
                log.warning("skipping an event this client cannot read: %s", exc)
                return None
            await self._deliver(event)
            return None
        try:
            reply = ApiReply.model_validate(message)
        except ValidationError as exc:
            return f"the daemon sent a malformed reply ({exc.error_count()} problems)"
        slot = self._pending.get(reply.id) if isinstance(reply.id, int) else None
        if slot is not None:
            slot.set(reply)
        elif reply.id is None and reply.error is not None:
            # Not tied to a request (a line the daemon could not read): remembered in case the
            # daemon hangs up next, so the requests that fail then say why.
            self._error_without_id = reply.error
            log.warning("the daemon says %s: %s", reply.error.code, reply.error.message)
        else:
            log.debug("dropping a reply to request %r, which no one awaits any more", reply.id)
        return None

    async def _deliver(self, event: ApiEvent) -> None:
        if isinstance(event, DownloadProgressEvent):
            # Progress is superseded by the next one; dropping it keeps half of the queue free
            # for the events that matter while the bot is busy.
            statistics = self._events.statistics()
            if statistics.current_buffer_used * 2 >= statistics.max_buffer_size:
                log.debug("event queue half full: dropping a progress event of %s", event.task_id)
                return
        # Waits while the queue is full: a bot that stops reading events holds up replies too.
        await self._events.send(event)

    def _fail(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        for slot in self._pending.values():
            slot.fail(self._lost)

    def _lost(self) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"lost the connection to dlkeeper at {self._socket_path} before its reply: "
            f"{self._failure}",
            self._socket_path,
        )


class _CannotConnectYet(Exception):
    """One connection attempt failed in a way that retrying may fix."""


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None and not str(exc) else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


# --- the client ---------------------------------------------------------------------------------


class DlkeeperClient:
    """A connection to the dlkeeper daemon, for use as `async with DlkeeperClient(path) as c:`.

    Methods may be called from many tasks at once: they share one connection, with their
    requests in flight together. `request_timeout` bounds every call; `connect_timeout` bounds
    how long a call waits for the daemon to (re)appear before it raises `DaemonUnavailable`;
    `event_buffer` is how many events wait for `events()` before the client holds up the socket.
    """

    def __init__(
        self,
        socket_path: str | Path = DEFAULT_SOCKET,
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        event_buffer: int = 1024,
    ) -> None:
        self._socket_path = Path(socket_path)
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._task_group: TaskGroup | None = None
        self._closed = False
        self._connection: _Connection | None = None
        self._connecting: _OneShot[_Connection] | None = None
        self._subscription: _Subscription | None = None
        self._events_send, self._events_receive = anyio.create_memory_object_stream[
            _EventQueueItem
        ](event_buffer)

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    async def __aenter__(self) -> Self:
        if self._task_group is not None or self._closed:
            raise RuntimeError("a DlkeeperClient can be entered only once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        self._closed = True
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        own: BaseException | None = None
        try:
            return await self._task_group.__aexit__(exc_type, exc, traceback)
        except BaseExceptionGroup as group:
            # The task group wraps what the `async with` block raised; a caller's
            # `except DaemonUnavailable` must see it as raised, not inside a group.
            if exc is None or list(leaves(group)) != [exc]:
                raise
            own = exc
        finally:
            self._events_send.close()
            self._events_receive.close()
        raise own  # outside the handler: the group does not become its context

    # --- the operations -------------------------------------------------------------------------

    async def ping(self) -> PingResult:
        """The daemon's version, whether it is ready, and its current problems (one sentence
        each; none while it is healthy)."""
        return _parse(PingResult, await self._call("ping", {}), "ping")

    async def add(
        self,
        *,
        magnet: str | None = None,
        torrent_b64: str | None = None,
        torrent_path: str | Path | None = None,
        task_id: str | None = None,
        name: str | None = None,
        save_path: str | Path | None = None,
        file_priorities: Sequence[int] | None = None,
        paused: bool | None = None,
        peers: Sequence[str] | None = None,
        torrent_metadata: Mapping[str, Any] | None = None,
        validation_metadata: Mapping[str, Any] | None = None,
    ) -> AddResult:
        """Adds a download from exactly one of `magnet`, `torrent_b64` or `torrent_path` (an
        absolute path the daemon can read). Adding a `task_id` again with the same torrent
        returns the existing download, so a retry is safe. Raises `Duplicate` (its `task_id`
        names the existing download) when the torrent is active under another `task_id`, and
        `NoSpace` (with `needed_bytes` and `free_bytes`) when a torrent's wanted bytes do not
        fit in the free space less the daemon's `min_free_bytes`."""
        sources = [source for source in (magnet, torrent_b64, torrent_path) if source is not None]
        if len(sources) != 1:
            raise ValueError("add() takes exactly one of magnet, torrent_b64 and torrent_path")
        params: dict[str, object] = {
            "magnet": magnet,
            "torrent_b64": torrent_b64,
            "torrent_path": _optional_str(torrent_path),
            "task_id": task_id,
            "name": name,
            "save_path": _optional_str(save_path),
            "file_priorities": None if file_priorities is None else builtins.list(file_priorities),
            "paused": paused,
            "peers": None if peers is None else builtins.list(peers),
            "torrent_metadata": None if torrent_metadata is None else dict(torrent_metadata),
            "validation_metadata": (
                None if validation_metadata is None else dict(validation_metadata)
            ),
        }
        return _parse(AddResult, await self._call("add", params), "add")

    async def add_torrent_file(
        self,
        path: str | Path,
        *,
        task_id: str | None = None,
        name: str | None = None,
        save_path: str | Path | None = None,
        file_priorities: Sequence[int] | None = None,
        paused: bool | None = None,
        peers: Sequence[str] | None = None,
        torrent_metadata: Mapping[str, Any] | None = None,
        validation_metadata: Mapping[str, Any] | None = None,
    ) -> AddResult:
        """Adds the .torrent file at `path`: read here and sent as `torrent_b64`, so the daemon
        need not be able to read `path` (nor keep it: it keeps its own copy).

        A file larger than `MAX_INLINE_TORRENT` does not fit in one request: it is sent as
        `torrent_path`, its absolute path, for the daemon to read itself (`BadRequest` when the
        daemon cannot). Only a regular file is read, and the read never blocks: a FIFO or a
        device is refused at once. Raises `OSError` when `path` cannot be read, and then sends
        nothing; otherwise it raises what `add()` raises."""
        torrent_b64, torrent_path = await anyio.to_thread.run_sync(_read_torrent_file, Path(path))
        return await self.add(
            torrent_b64=torrent_b64,
            torrent_path=torrent_path,
            task_id=task_id,
            name=name,
            save_path=save_path,
            file_priorities=file_priorities,
            paused=paused,
            peers=peers,
            torrent_metadata=torrent_metadata,
            validation_metadata=validation_metadata,
        )

    async def get(self, task_id: str) -> DownloadInfo:
        """One download; raises `NotFound`."""
        return _parse(DownloadInfo, await self._call("get", {"task_id": task_id}), "get")

    async def list(self) -> builtins.list[DownloadInfo]:
        """Every download the daemon keeps, including completed and failed ones not yet acked."""
        result = _parse(ListResult, await self._call("list", {}), "list")
        return builtins.list(result.downloads)

    async def pause(self, task_id: str) -> DownloadInfo:
        """Pauses a download; it stays paused across daemon restarts. Raises `NotFound`."""
        return _parse(DownloadInfo, await self._call("pause", {"task_id": task_id}), "pause")

    async def resume(self, task_id: str) -> DownloadInfo:
        """Resumes a paused download. Raises `NotFound`."""
        return _parse(DownloadInfo, await self._call("resume", {"task_id": task_id}), "resume")

    async def cancel(self, task_id: str, *, delete_files: bool = False) -> None:
        """Removes a download; its files stay unless `delete_files`. Raises `NotFound`."""
        await self._call("cancel", {"task_id": task_id, "delete_files": delete_files})

    async def set_files(self, task_id: str, file_priorities: Sequence[int]) -> DownloadInfo:
        """Sets the priority (0 = skip .. 7) of each file, in the torrent's file order."""
        params: dict[str, object] = {
            "task_id": task_id,
            "file_priorities": builtins.list(file_priorities),
        }
        return _parse(DownloadInfo, await self._call("set_files", params), "set_files")

    async def ack(self, task_id: str) -> None:
        """Tells the daemon the bot has taken a completed or failed download: the daemon forgets
        it (the files stay) and stops re-sending its event. Send it after the import."""
        await self._call("ack", {"task_id": task_id})

    async def retry(self, task_id: str) -> DownloadInfo:
        """Starts a failed download again from its kept .torrent or magnet: the files on disk
        are checked, not fetched again, and its error is cleared. Raises `NotFound`, and
        `BadRequest` for a download that is not failed."""
        return _parse(DownloadInfo, await self._call("retry", {"task_id": task_id}), "retry")

    async def stats(self) -> StatsResult:
        """Counts by status, replay and worker restart figures, uptime, current problems, and
        the free bytes on the download file system (None when they cannot be read)."""
        return _parse(StatsResult, await self._call("stats", {}), "stats")

    async def subscribe(self, progress_interval: float | None = None) -> None:
        """Asks for events, now and after every reconnect; read them with `events()`.

        Every subscribe first receives each unacknowledged completion and failure again.
        `progress_interval` (seconds) adds `download.progress` events. Subscribe once per client:
        calling it again with the same interval does nothing more, and with another one raises
        `RuntimeError` (the daemon keeps a connection's subscription as it was made).
        """
        wanted = _Subscription(progress_interval)
        previous = self._subscription
        if previous is not None and previous != wanted:
            raise RuntimeError(
                f"this client is subscribed with progress_interval={previous.progress_interval}; "
                "use another DlkeeperClient for another interval"
            )
        self._subscription = wanted
        try:
            with self._deadline("subscribe"):
                connection = await self._connected()
                if connection.subscription != wanted:
                    await self._subscribe(connection, wanted)
        except RequestError:
            self._subscription = previous
            raise

    def events(self) -> AsyncIterator[ApiEvent]:
        """The events of the subscription, in the order the daemon sent them, across reconnects.

        It reconnects by itself when the daemon restarts (raising `DaemonUnavailable` if the
        daemon stays away longer than `connect_timeout`: iterate again to wait again) and ends
        when the client is closed. Meant for one consumer: two iterators share the events.
        While more than half of `event_buffer` events wait, progress events are dropped.
        """
        if self._subscription is None:
            raise RuntimeError("call subscribe() before events()")
        return _EventIterator(self)

    # --- requests -------------------------------------------------------------------------------

    async def _call(self, op: str, params: dict[str, object]) -> dict[str, Any]:
        """Sends one request under the deadline and returns its result, or raises its error."""
        request_id, line = self._encode(op, params)
        with self._deadline(op):
            connection = await self._connected()
            reply = await connection.request(request_id, line)
        return self._result(reply, params)

    def _encode(self, op: str, params: dict[str, object]) -> tuple[int, bytes]:
        request_id = next(self._ids)
        request: dict[str, object] = {"id": request_id, "op": op}
        request.update((key, value) for key, value in params.items() if value is not None)
        line = orjson.dumps(request) + b"\n"
        if len(line) > MAX_REQUEST_LINE:
            raise TooLarge(
                f"the {op} request is {len(line)} bytes, more than the daemon's limit of "
                f"{MAX_REQUEST_LINE} bytes per line"
            )
        return request_id, line

    @staticmethod
    def _result(reply: ApiReply, params: dict[str, object]) -> dict[str, Any]:
        if reply.ok:
            return reply.result or {}
        error = reply.error or ApiError(code="internal", message="the daemon gave no reason")
        task_id = params.get("task_id")
        raise _request_error(error, task_id if isinstance(task_id, str) else None)

    @contextmanager
    def _deadline(self, op: str) -> Iterator[None]:
        with anyio.move_on_after(self._request_timeout) as scope:
            yield
        if scope.cancelled_caught:
            raise RequestTimeout(
                f"no answer from dlkeeper at {self._socket_path} to {op} "
                f"within {self._request_timeout:g} s",
                self._socket_path,
            )

    async def _subscribe(self, connection: _Connection, subscription: _Subscription) -> None:
        connection.subscription = subscription  # from now on its end wakes the event iterator
        params = subscription.params()
        request_id, line = self._encode("subscribe", params)
        self._result(await connection.request(request_id, line), params)

    # --- connecting -----------------------------------------------------------------------------

    async def _connected(self) -> _Connection:
        """The live connection, made (and subscribed) first when there is none.

        One attempt at a time runs in the client's task group, and every caller waits for it:
        a caller's deadline then never cuts short the attempt the others are waiting for.
        """
        if self._closed:
            raise RuntimeError("the DlkeeperClient is closed")
        if self._task_group is None:
            raise RuntimeError("use the client inside `async with DlkeeperClient(...)`")
        if self._connection is not None and self._connection.alive:
            return self._connection
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = _OneShot[_Connection]()
            self._task_group.start_soon(self._connect, attempt)
        return await attempt.wait()

    async def _connect(self, attempt: _OneShot[_Connection]) -> None:
        try:
            connection = await self._connect_with_backoff()
        except DaemonUnavailable as exc:
            message, kind = exc.message, type(exc)
            attempt.fail(lambda: kind(message, self._socket_path))
        else:
            self._connection = connection
            attempt.set(connection)
        finally:
            self._connecting = None
            attempt.fail(
                lambda: DaemonUnavailable(
                    f"the client was closed while connecting to dlkeeper at {self._socket_path}",
                    self._socket_path,
                )
            )

    async def _connect_with_backoff(self) -> _Connection:
        deadline = anyio.current_time() + self._connect_timeout
        delay = RECONNECT_DELAY_FIRST
        for attempts in itertools.count(1):
            try:
                return await self._open(deadline)
            except _CannotConnectYet as exc:
                problem = str(exc)
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise DaemonNotRunning(
                    f"no dlkeeper at {self._socket_path} — is the service running? "
                    f"({problem}; gave up after {attempts} attempts in "
                    f"{self._connect_timeout:g} s)",
                    self._socket_path,
                )
            log.debug("dlkeeper at %s: %s; retrying in %g s", self._socket_path, problem, delay)
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, RECONNECT_DELAY_MAX)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self, deadline: float) -> _Connection:
        assert self._task_group is not None
        try:
            # A listener that stopped accepting must not stall the attempt past its deadline.
            with anyio.fail_after(max(deadline - anyio.current_time(), RECONNECT_DELAY_FIRST)):
                stream = await anyio.connect_unix(self._socket_path)
        except (FileNotFoundError, ConnectionError, TimeoutError) as exc:
            raise _CannotConnectYet(_describe(exc)) from exc
        except PermissionError as exc:
            raise DaemonUnavailable(
                f"permission denied on dlkeeper's socket {self._socket_path} — is this user in "
                "the socket's group?",
                self._socket_path,
            ) from exc
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot connect to dlkeeper at {self._socket_path}: {_describe(exc)}",
                self._socket_path,
            ) from exc
        connection = _Connection(stream, self._socket_path, self._events_send)
        self._task_group.start_soon(connection.read_replies)
        subscription = self._subscription
        if subscription is not None:
            try:
                with self._deadline("subscribe"):
                    await self._subscribe(connection, subscription)
            except (DaemonUnavailable, RequestError) as exc:
                connection.abort(f"subscribing again failed: {exc}")
                raise _CannotConnectYet(f"subscribing again failed: {exc}") from exc
        return connection

    # --- events ---------------------------------------------------------------------------------

    async def _next_event(self) -> ApiEvent:
        while True:
            try:
                try:
                    item = self._events_receive.receive_nowait()
                except anyio.WouldBlock:
                    # Nothing buffered: make sure a subscribed connection exists to bring more.
                    await self._connected()
                    item = await self._events_receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            if not isinstance(item, _ConnectionLost):
                return item


class _EventIterator:
    def __init__(self, client: DlkeeperClient) -> None:
        self._client = client

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ApiEvent:
        return await self._client._next_event()


def _parse(model: type[M], result: dict[str, Any], op: str) -> M:
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        raise ProtocolError(
            f"dlkeeper answered {op} with a result this client cannot read: {exc}"
        ) from exc


def _optional_str(value: str | Path | None) -> str | None:
    return None if value is None else str(value)


def _read_torrent_file(path: Path) -> tuple[str | None, str | None]:
    """`(torrent_b64, torrent_path)` for `add`: the file's content, or for a file too large to
    send, its absolute path. Raises `OSError` for a file that cannot be read."""
    # Here, not at the top: the bot's `import supervisor.client` stays the wire models and the
    # errors, and the careful reader is the one the daemon reads a torrent_path with.
    from actors.atomic import read_small_file  # noqa: PLC0415 (only when a file is read)

    if path.stat().st_size > MAX_INLINE_TORRENT:
        return None, str(path.absolute())
    try:
        # Not a plain read: a FIFO would block it for good, a device feed it without end.
        data = read_small_file(path, MAX_INLINE_TORRENT)
    except DlkeeperError as exc:  # not a regular file, or grown past the limit since stat()
        raise OSError(str(exc)) from None
    return base64.b64encode(data).decode("ascii"), None
